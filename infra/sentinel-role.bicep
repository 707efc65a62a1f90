// Microsoft Sentinel Contributor on the Sentinel workspace for the function app's managed
// identity; deployed at the workspace's resource group, which may differ from the app's.

@description('Name of the Log Analytics workspace with Microsoft Sentinel.')
param workspaceName string

@description('Principal id of the managed identity.')
param principalId string

var sentinelContributor = 'ab8e14d6-4a74-4a29-9ba8-549422addade'

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: workspaceName
}

resource role 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, principalId, sentinelContributor)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', sentinelContributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
