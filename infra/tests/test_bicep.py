"""Checks of the Bicep that no compiler runs here: it parses (pycep), every parameter of the
vendor's template is there with its default and range, every setting the code reads is set
(or exempt for a stated reason), secrets are Key Vault references, and DEPLOY.md uses the
template's real names."""

import json
import re
from pathlib import Path

import pytest
from pycep import BicepParser

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "infra" / "main.bicep"


@pytest.fixture(scope="module")
def main():
    return BicepParser().parse(file_path=MAIN)


def code_settings():
    """The SETTINGS list in src/config.rs: every setting the product reads."""
    text = (ROOT / "src" / "config.rs").read_text()
    block = re.search(r"pub const SETTINGS: &\[&str\] = &\[(.*?)\];", text, re.S).group(1)
    return re.findall(r'"([A-Za-z0-9_]+)"', block)


def app_settings(main):
    """Setting names in both branches of the app settings (with and without an app registration)."""
    names = set()
    common = main["variables"]["commonSettings"]["value"]
    names.update(s["name"] for s in common)
    cond = main["variables"]["appRegistrationSettings"]["value"]["operator"]["operands"]
    for branch in ("true_value", "false_value"):
        names.update(s["name"] for s in cond[branch])
    return names


# Read by the code, deliberately not set in Azure, and why.
EXEMPT = {
    "STATE_DIR": "state goes to Blob (STATE_CONTAINER_URL)",
    "STATE_CONTAINER_SAS_URL": "the managed identity reaches the state container; no SAS to leak",
    "AzureWebJobsStorage": "the host uses the identity-based AzureWebJobsStorage__* form; the code reads the plain one only for Azurite",
    "MATI_BASE_URL": "endpoint override; the default is Mandiant's public API",
    "SENTINEL_ENDPOINT": "endpoint override; the default follows AZURE_CLOUD",
    "AZURE_AUTHORITY_HOST": "endpoint override; the default follows AZURE_CLOUD",
    "AZURE_RESOURCE_MANAGER_ENDPOINT": "endpoint override; the default follows AZURE_CLOUD",
    "HTTP_TIMEOUT_SECONDS": "tuning for slow links; the default suits Azure's own network",
}

VENDOR_PARAMETERS = {
    # name: (type, default or None when required, allowed, min, max, secure)
    "matiKey": ("string", None, None, None, None, True),
    "matiSecret": ("string", None, None, None, None, True),
    "azureWorkspaceId": ("string", None, None, None, None, False),
    "azureClientId": ("string", "", None, None, None, False),
    "azureClientSecret": ("string", "", None, None, None, True),
    "azureTenantId": ("string", "*", None, None, None, False),
    "ipIndicatorExpiration": ("int", 7, None, 1, 365, False),
    "fqdnIndicatorExpiration": ("int", 7, None, 1, 365, False),
    "urlIndicatorExpiration": ("int", 7, None, 1, 365, False),
    "hashIndicatorExpiration": ("int", 90, None, 1, 365, False),
    "initialLookback": ("int", 30, None, 1, 89, False),
    "minimumConfidence": ("int", 80, None, 0, 100, False),
    "minimumThreatScore": ("int", 80, None, 0, 100, False),
    "excludeOsInt": ("bool", True, None, None, None, False),
    "defaultAction": ("string", "alert", ["alert", "block", "allow"], None, None, False),
    "includeUncategorized": ("bool", True, None, None, None, False),
    "hashType": ("string", "md5", ["md5", "sha1", "sha256"], None, None, False),
    "includeIpv4": ("bool", True, None, None, None, False),
    "includeHash": ("bool", True, None, None, None, False),
    "includeUrl": ("bool", True, None, None, None, False),
    "includeFqdn": ("bool", True, None, None, None, False),
    "passiveOnly": ("bool", False, None, None, None, False),
    "syncSchedule": ("int", 4, None, 1, 168, False),
    "enableDeduplication": ("bool", False, None, None, None, False),
    "azureWorkspaceName": ("string", "", None, None, None, False),
    "azureSubscriptionId": ("string", "*", None, None, None, False),
    "azureResourceGroupName": ("string", "*", None, None, None, False),
}


def decorator(param, kind):
    for d in param.get("decorators", []):
        if d["type"] == kind:
            return d.get("argument", True)
    return None


def test_every_bicep_file_parses():
    for path in sorted((ROOT / "infra").glob("*.bicep")):
        tree = BicepParser().parse(file_path=path)
        assert tree["resources"], f"{path.name} declares no resource"


@pytest.mark.parametrize("name", sorted(VENDOR_PARAMETERS))
def test_vendor_parameter(main, name):
    kind, default, allowed, lo, hi, secure = VENDOR_PARAMETERS[name]
    param = main["parameters"].get(name)
    assert param is not None, f"parameter {name} is missing"
    assert param["type"] == kind
    if default is None:
        assert param.get("default") is None, f"{name} must be required"
    elif default != "*":
        assert param["default"] == default
    assert decorator(param, "allowed") == allowed
    assert decorator(param, "min_value") == lo
    assert decorator(param, "max_value") == hi
    assert (decorator(param, "secure") is not None) == secure, f"{name} @secure()"


def test_every_setting_the_code_reads_is_set_or_exempt(main):
    settings = app_settings(main)
    missing = [s for s in code_settings() if s not in settings and s not in EXEMPT]
    assert not missing, f"app settings the code reads but main.bicep does not set: {missing}"
    stale = [s for s in EXEMPT if s not in code_settings()]
    assert not stale, f"exemptions for settings the code no longer reads: {stale}"


def test_no_app_setting_is_unknown_to_the_code(main):
    known = set(code_settings())
    host = {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId"}
    unknown = sorted(app_settings(main) - known - host)
    assert not unknown, f"app settings nothing reads (misspelt?): {unknown}"


def test_secrets_are_key_vault_references(main):
    values = {s["name"]: s["value"] for s in main["variables"]["commonSettings"]["value"]}
    cond = main["variables"]["appRegistrationSettings"]["value"]["operator"]["operands"]["false_value"]
    values.update({s["name"]: s["value"] for s in cond})
    for name in ("MATI_API_KEY", "MATI_API_SECRET", "AZURE_CLIENT_SECRET"):
        assert values[name].startswith("${keyVaultReference}"), name
    assert main["variables"]["keyVaultReference"]["value"].startswith("@Microsoft.KeyVault(SecretUri=")


def resource(main, type_):
    found = [r for r in main["resources"].values() if r["type"] == type_]
    assert len(found) == 1, type_
    return found[0]["config"]


def test_storage_has_no_shared_keys_or_public_blobs(main):
    props = resource(main, "Microsoft.Storage/storageAccounts")["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"


def test_the_app_is_a_flex_consumption_custom_handler(main):
    plan = resource(main, "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    site = resource(main, "Microsoft.Web/sites")
    assert site["kind"] == "functionapp,linux"
    assert site["properties"]["functionAppConfig"]["runtime"] == {"name": "custom", "version": "1.0"}
    kv_identity = site["properties"]["keyVaultReferenceIdentity"]["operator"]["operands"]
    assert kv_identity == {"operand_1": "identity", "operand_2": "id"}, "Key Vault references use the UAMI"
    vault = resource(main, "Microsoft.KeyVault/vaults")
    assert vault["properties"]["enableRbacAuthorization"] is True


def test_the_sentinel_role_goes_to_the_managed_identity_only_without_a_secret(main):
    module = main["modules"]["sentinelRole"]
    assert "useManagedIdentityForSentinel" in str(module)
    role = (ROOT / "infra" / "sentinel-role.bicep").read_text()
    assert "ab8e14d6-4a74-4a29-9ba8-549422addade" in role, "Microsoft Sentinel Contributor"


def test_deploy_md_uses_the_real_names(main):
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    used = set(re.findall(r"\b([a-z][A-Za-z]+)=", " ".join(re.findall(r"--parameters[^\n]*(?:\n\s+[^\n]*)*", text))))
    params = set(main["parameters"])
    assert used, "DEPLOY.md passes no parameters"
    assert used <= params, f"DEPLOY.md names parameters main.bicep does not have: {sorted(used - params)}"
    outputs = set(re.findall(r"outputs\.(\w+)\.value", text))
    assert outputs, "DEPLOY.md reads no outputs"
    assert outputs <= set(main["outputs"]), f"unknown outputs: {sorted(outputs - set(main['outputs']))}"
    example = __import__("json").loads((ROOT / "infra" / "main.parameters.json").read_text())
    assert set(example["parameters"]) <= params


def summary_event_fields():
    """The event name and the field names of the summary event in src/telemetry.rs."""
    text = (ROOT / "src" / "telemetry.rs").read_text()
    name = re.search(r'pub const SUMMARY_EVENT: &str = "([^"]+)";', text).group(1)
    body = re.search(r"pub fn summary_event\(.*?\n\}", text, re.S).group(0)
    fields = set(re.findall(r"^\s+([a-z0-9_]+) = ", body, re.M))
    return name, fields


def queries(main):
    workbook = json.loads((ROOT / "infra" / "workbook.json").read_text())
    found = [i["content"]["query"] for i in workbook["items"] if i["type"] == 3]
    for r in main["resources"].values():
        if r["type"] == "Microsoft.Insights/scheduledQueryRules":
            found += [c["query"] for c in r["config"]["properties"]["criteria"]["allOf"]]
    return found


def test_workbook_and_alerts_use_the_events_real_names(main):
    name, fields = summary_event_fields()
    assert {"outcome", "uploaded", "refused", "throttled", "duration_ms"} <= fields
    qs = queries(main)
    assert len(qs) >= 8
    for q in qs:
        for used in re.findall(r'customEvents\s*\|\s*where name == "([^"]+)"', q):
            assert used == name, f"query names event {used!r}, the code sends {name!r}"
        if "customEvents" in q:
            dims = set(re.findall(r"customDimensions\.([A-Za-z0-9_]+)", q))
            assert dims, q
            assert dims <= fields, f"unknown fields {sorted(dims - fields)} in: {q}"
    outcomes = set(re.findall(r'"([a-z_]+)"', (ROOT / "src" / "telemetry.rs").read_text().split("pub fn outcome")[1].split("}")[0]))
    for q in qs:
        for used in re.findall(r'customDimensions\.outcome\) == "([a-z_]+)"', q):
            assert used in outcomes, used


def test_the_refusal_trace_query_uses_the_logged_message():
    workbook = json.loads((ROOT / "infra" / "workbook.json").read_text())
    q = next(i["content"]["query"] for i in workbook["items"] if i.get("name") == "refusal_messages")
    message = re.search(r'message == "([^"]+)"', q).group(1)
    sync = (ROOT / "src" / "sync.rs").read_text()
    assert f'"{message}"' in sync
    for dim in re.findall(r"customDimensions\.([a-z_]+)", q):
        assert f"{dim} = %" in sync, dim
