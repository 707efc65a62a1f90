// mati-sentinel on Azure Functions Flex Consumption: the function app (custom handler), its
// storage (deployment package and sync state), a user-assigned identity, a Key Vault holding
// the secrets as Key Vault references, and Application Insights on Log Analytics.
// Parameter names, defaults and ranges follow the vendor's Sentinel integration template.

targetScope = 'resourceGroup'

// ---- Mandiant -------------------------------------------------------------------------------

@description('Mandiant Threat Intelligence API key id.')
@secure()
param matiKey string

@description('Mandiant Threat Intelligence API secret.')
@secure()
param matiSecret string

// ---- Sentinel -------------------------------------------------------------------------------

@description('Log Analytics workspace ID (a GUID, on the workspace Overview page) of the Sentinel workspace.')
param azureWorkspaceId string

@description('Application (client) id of an Entra app registration for Sentinel. Leave empty, with azureClientSecret, to use the function app managed identity.')
param azureClientId string = ''

@description('Client secret of that app registration. Empty: the managed identity is used and granted Microsoft Sentinel Contributor on the workspace.')
@secure()
param azureClientSecret string = ''

@description('Entra tenant of the app registration.')
param azureTenantId string = subscription().tenantId

@description('Name of the Sentinel Log Analytics workspace (for the managed identity role assignment and ENABLE_DEDUPLICATION).')
param azureWorkspaceName string = ''

@description('Subscription of the Sentinel workspace.')
param azureSubscriptionId string = subscription().subscriptionId

@description('Resource group of the Sentinel workspace.')
param azureResourceGroupName string = resourceGroup().name

// ---- Policy and mapping -------------------------------------------------------------------

@description('Days an IPv4 indicator stays valid after upload.')
@minValue(1)
@maxValue(365)
param ipIndicatorExpiration int = 7

@description('Days a domain indicator stays valid after upload.')
@minValue(1)
@maxValue(365)
param fqdnIndicatorExpiration int = 7

@description('Days a URL indicator stays valid after upload.')
@minValue(1)
@maxValue(365)
param urlIndicatorExpiration int = 7

@description('Days a file hash indicator stays valid after upload.')
@minValue(1)
@maxValue(365)
param hashIndicatorExpiration int = 90

@description('Days fetched on the first run (Mandiant serves 90 days at most).')
@minValue(1)
@maxValue(89)
param initialLookback int = 30

@description('Minimum Mandiant confidence (mscore).')
@minValue(0)
@maxValue(100)
param minimumConfidence int = 80

@description('Minimum Mandiant threat score.')
@minValue(0)
@maxValue(100)
param minimumThreatScore int = 80

@description('Leave out indicators whose every source is open-source.')
param excludeOsInt bool = true

@description('Carried on every indicator as a label and in its extension (Sentinel itself never blocks).')
@allowed([
  'alert'
  'block'
  'allow'
])
param defaultAction string = 'alert'

@description('Keep indicators with no category.')
param includeUncategorized bool = true

@description('Which hash of a file indicator becomes the pattern.')
@allowed([
  'md5'
  'sha1'
  'sha256'
])
param hashType string = 'md5'

param includeIpv4 bool = true
param includeHash bool = true
param includeUrl bool = true
param includeFqdn bool = true

@description('Carried on every indicator as a label and in its extension.')
param passiveOnly bool = false

@description('Hours between sync cycles.')
@minValue(1)
@maxValue(168)
param syncSchedule int = 4

@description('Reconcile with the indicators already in the workspace (needs azureWorkspaceName).')
param enableDeduplication bool = false

// ---- This deployment ----------------------------------------------------------------------

param location string = resourceGroup().location

@description('Sentinel upload API: stix-objects (current) or upload-indicators (legacy).')
@allowed([
  'stix-objects'
  'upload-indicators'
])
param sentinelUploadApi string = 'stix-objects'

@description('How often the Functions timer ticks (NCRONTAB, UTC); a tick runs a cycle only when one is due.')
param timerSchedule string = '0 */15 * * * *'

@description('E-mail address for the alerts (a failed cycle; no completed cycle within twice syncSchedule). Empty: the alert rules fire without notifying anyone.')
param alertEmail string = ''

@description('Short prefix for resource names.')
@maxLength(10)
param namePrefix string = 'matisent'

var token = uniqueString(resourceGroup().id, namePrefix)
var deploymentContainerName = 'app-package'
var stateContainerName = 'mati-sentinel-state'
var useManagedIdentityForSentinel = empty(azureClientSecret)
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${namePrefix}-id-${token}'
  location: location
}

// ---- Storage: the deployment package, the host's timer state, and our sync state ----------

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: without VNet integration (not in this template) Flex needs the account reachable; every request still needs an Entra token (shared keys off, no anonymous blobs)
  // checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35: network access stays open, access is identity-only
  // checkov:skip=CKV_AZURE_43: the name is take(prefix + uniqueString(...), 24): lowercase letters and digits, 3-24 characters, which checkov cannot evaluate
  name: take('${namePrefix}st${token}', 24)
  location: location
  kind: 'StorageV2'
  sku: {
    name: 'Standard_GRS'
  }
  properties: {
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    defaultToOAuthAuthentication: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource stateContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: stateContainerName
  properties: {
    publicAccess: 'None'
  }
}

// The host (deployment package, timer schedule monitor) and the state store both use blob only.
resource storageRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, roles.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---- Key Vault: the secrets, read by the app through Key Vault references ------------------

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: Key Vault references from a Flex app without VNet integration need the vault reachable; reads need the identity's Key Vault Secrets User role
  // checkov:skip=CKV_AZURE_189: same reason as CKV_AZURE_109
  name: take('${namePrefix}kv${token}', 24)
  location: location
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource matiKeySecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: the Mandiant credentials have no fixed lifetime; rotate by adding a new secret version (references pick it up within 24 h) rather than letting a date stop the sync
  parent: vault
  name: 'mati-api-key'
  properties: {
    value: matiKey
    contentType: 'text/plain'
  }
}

resource matiSecretSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  // checkov:skip=CKV_AZURE_41: the Mandiant credentials have no fixed lifetime; rotate by adding a new secret version (references pick it up within 24 h) rather than letting a date stop the sync
  parent: vault
  name: 'mati-api-secret'
  properties: {
    value: matiSecret
    contentType: 'text/plain'
  }
}

resource sentinelClientSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!useManagedIdentityForSentinel) {
  // checkov:skip=CKV_AZURE_41: the app registration secret's lifetime is set in Entra ID; rotate it there and add a new version here
  // checkov:skip=CKV_AZURE_114: contentType is set below; checkov does not read properties of a conditional resource
  parent: vault
  name: 'sentinel-client-secret'
  properties: {
    value: azureClientSecret
    contentType: 'text/plain'
  }
}

resource vaultRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---- Monitoring ----------------------------------------------------------------------------

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${namePrefix}-log-${token}'
  location: location
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: 30
  }
}

// Local (instrumentation key) ingestion stays enabled: the Rust exporter cannot use Entra ingestion.
resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${namePrefix}-appi-${token}'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: false
  }
}

// The operations workbook: cycles, uploads by type, rejections, refusals, throttling, duration.
resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, namePrefix, 'mati-sentinel-workbook')
  location: location
  kind: 'shared'
  properties: {
    displayName: 'mati-sentinel'
    category: 'workbook'
    sourceId: insights.id
    serializedData: loadTextContent('workbook.json')
  }
}

resource alertActions 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: '${namePrefix}-alerts-${token}'
  location: 'global'
  properties: {
    groupShortName: 'matisent'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var alertActionGroups = empty(alertEmail) ? [] : [alertActions.id]

// Any failed cycle (the event carries outcome "failed"; the host also records a failed invocation).
resource failedCycleAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-failed-cycle-${token}'
  location: location
  properties: {
    displayName: 'mati-sentinel: a sync cycle failed'
    description: 'A cycle failed; the SyncCycleSummary event and the traces of the cycle say why (for example a missing role or an expired secret).'
    severity: 2
    enabled: true
    scopes: [
      insights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'
    criteria: {
      allOf: [
        {
          query: 'customEvents | where name == "SyncCycleSummary" | where tostring(customDimensions.outcome) == "failed"'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: alertActionGroups
    }
  }
}

// No completed cycle within twice the schedule (capped at the two days a log alert can look back).
resource silentAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = {
  name: '${namePrefix}-no-cycle-${token}'
  location: location
  properties: {
    displayName: 'mati-sentinel: no completed sync cycle'
    description: 'No cycle completed within twice syncSchedule: the sync is failing, stuck, or not running.'
    severity: 2
    enabled: true
    scopes: [
      insights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT${min(2 * syncSchedule, 48)}H'
    criteria: {
      allOf: [
        {
          query: 'customEvents | where name == "SyncCycleSummary" | where tostring(customDimensions.outcome) == "completed"'
          timeAggregation: 'Count'
          operator: 'LessThan'
          threshold: 1
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: alertActionGroups
    }
  }
}

// ---- The function app ----------------------------------------------------------------------

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: Flex Consumption zone redundancy is only offered in some regions; a timer that retries every 15 minutes does not need it
  name: '${namePrefix}-plan-${token}'
  location: location
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

var keyVaultReference = '@Microsoft.KeyVault(SecretUri=${vault.properties.vaultUri}secrets/'

var commonSettings = [
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storage.name
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identity.properties.clientId
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: insights.properties.ConnectionString
  }
  {
    name: 'MATI_API_KEY'
    value: '${keyVaultReference}mati-api-key/)'
  }
  {
    name: 'MATI_API_SECRET'
    value: '${keyVaultReference}mati-api-secret/)'
  }
  {
    name: 'AZURE_WORKSPACE_ID'
    value: azureWorkspaceId
  }
  {
    name: 'MANAGED_IDENTITY_CLIENT_ID'
    value: identity.properties.clientId
  }
  {
    name: 'STATE_CONTAINER_URL'
    value: '${storage.properties.primaryEndpoints.blob}${stateContainerName}'
  }
  {
    name: 'TIMER_SCHEDULE'
    value: timerSchedule
  }
  {
    name: 'SYNC_SCHEDULE'
    value: string(syncSchedule)
  }
  {
    name: 'SYNC_TIME_BUDGET_SECONDS'
    value: '1500'
  }
  {
    name: 'IP_INDICATOR_EXPIRATION'
    value: string(ipIndicatorExpiration)
  }
  {
    name: 'FQDN_INDICATOR_EXPIRATION'
    value: string(fqdnIndicatorExpiration)
  }
  {
    name: 'URL_INDICATOR_EXPIRATION'
    value: string(urlIndicatorExpiration)
  }
  {
    name: 'HASH_INDICATOR_EXPIRATION'
    value: string(hashIndicatorExpiration)
  }
  {
    name: 'INITIAL_LOOKBACK'
    value: string(initialLookback)
  }
  {
    name: 'MINIMUM_CONFIDENCE'
    value: string(minimumConfidence)
  }
  {
    name: 'MINIMUM_THREAT_SCORE'
    value: string(minimumThreatScore)
  }
  {
    name: 'EXCLUDE_OSINT'
    value: string(excludeOsInt)
  }
  {
    name: 'INCLUDE_UNCATEGORIZED'
    value: string(includeUncategorized)
  }
  {
    name: 'HASH_TYPE'
    value: hashType
  }
  {
    name: 'INCLUDE_IPV4'
    value: string(includeIpv4)
  }
  {
    name: 'INCLUDE_FQDN'
    value: string(includeFqdn)
  }
  {
    name: 'INCLUDE_URL'
    value: string(includeUrl)
  }
  {
    name: 'INCLUDE_HASH'
    value: string(includeHash)
  }
  {
    name: 'DEFAULT_ACTION'
    value: defaultAction
  }
  {
    name: 'PASSIVE_ONLY'
    value: string(passiveOnly)
  }
  {
    name: 'ENABLE_DEDUPLICATION'
    value: string(enableDeduplication)
  }
  {
    name: 'AZURE_WORKSPACE_NAME'
    value: azureWorkspaceName
  }
  {
    name: 'AZURE_SUBSCRIPTION_ID'
    value: azureSubscriptionId
  }
  {
    name: 'AZURE_RESOURCE_GROUP_NAME'
    value: azureResourceGroupName
  }
  {
    name: 'SENTINEL_UPLOAD_API'
    value: sentinelUploadApi
  }
  {
    name: 'SENTINEL_SOURCE_SYSTEM'
    value: 'Mandiant'
  }
  {
    name: 'AZURE_CLOUD'
    value: 'public'
  }
]

// Only with an app registration: without a secret the managed identity signs in to Sentinel.
var appRegistrationSettings = useManagedIdentityForSentinel ? [] : [
  {
    name: 'AZURE_TENANT_ID'
    value: azureTenantId
  }
  {
    name: 'AZURE_CLIENT_ID'
    value: azureClientId
  }
  {
    name: 'AZURE_CLIENT_SECRET'
    value: '${keyVaultReference}sentinel-client-secret/)'
  }
]

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: the app has no HTTP functions; public access is needed for zip deployment and the admin endpoint (function keys required)
  // checkov:skip=CKV_AZURE_212: a timer-only app on Flex scales from zero by design; the timer runs on one instance
  // checkov:skip=CKV_AZURE_213: App Service health checks do not apply to Flex Consumption; the host checks the handler itself (GET /)
  name: '${namePrefix}-func-${token}'
  location: location
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: true
    clientCertMode: 'OptionalInteractiveUser'
    keyVaultReferenceIdentity: identity.id
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: 40
        instanceMemoryMB: 512
      }
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
      appSettings: concat(commonSettings, appRegistrationSettings)
    }
  }
  dependsOn: [
    storageRole
    vaultRole
    deploymentContainer
    stateContainer
  ]
}

// Without an app registration, the identity needs Microsoft Sentinel Contributor on the
// workspace, which may live in another resource group or subscription.
module sentinelRole 'sentinel-role.bicep' = if (useManagedIdentityForSentinel) {
  name: 'sentinel-role-${token}'
  scope: resourceGroup(azureSubscriptionId, azureResourceGroupName)
  params: {
    workspaceName: azureWorkspaceName
    principalId: identity.properties.principalId
  }
}

output functionAppName string = app.name
output storageAccountName string = storage.name
output deploymentContainerUrl string = '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
output keyVaultName string = vault.name
output applicationInsightsName string = insights.name
output managedIdentityClientId string = identity.properties.clientId
output managedIdentityPrincipalId string = identity.properties.principalId
