//! The deployable zip: what the Functions host needs, where it looks, with the binary
//! executable.

use std::process::Command;

#[test]
fn the_zip_holds_the_host_files_and_an_executable_handler() {
    let dir = tempfile::tempdir().unwrap();
    let zip = dir.path().join("app.zip");
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/package.sh"))
        .arg(&zip)
        .env("MATI_SENTINEL_BIN", env!("CARGO_BIN_EXE_mati-sentinel"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Read it back with an independent reader: name, Unix mode, and the JSON files parsed.
    let listing = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, json, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             print(json.dumps({i.filename: [i.external_attr >> 16, i.file_size] for i in z.infolist()}))",
        )
        .arg(&zip)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let entries: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    let names: Vec<&String> = entries.as_object().unwrap().keys().collect();
    assert_eq!(
        names,
        vec!["SyncIndicators/function.json", "host.json", "mati-sentinel"]
    );
    assert_eq!(entries["mati-sentinel"][0].as_u64().unwrap() & 0o777, 0o755);
    assert_eq!(
        entries["mati-sentinel"][0].as_u64().unwrap() & 0o170000,
        0o100000,
        "a regular file"
    );
    let size = std::fs::metadata(env!("CARGO_BIN_EXE_mati-sentinel"))
        .unwrap()
        .len();
    assert_eq!(entries["mati-sentinel"][1].as_u64().unwrap(), size);
    assert_eq!(entries["host.json"][0].as_u64().unwrap() & 0o777, 0o644);
}

#[test]
fn host_json_starts_the_binary_as_the_handler_and_the_timer_reads_its_schedule() {
    let root = env!("CARGO_MANIFEST_DIR");
    let host: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/functions/host.json")).unwrap(),
    )
    .unwrap();
    let desc = &host["customHandler"]["description"];
    assert_eq!(desc["defaultExecutablePath"], "mati-sentinel");
    assert_eq!(desc["arguments"], serde_json::json!(["serve"]));
    assert_eq!(host["functionTimeout"], "00:30:00");
    assert_eq!(host["version"], "2.0");
    let function: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/functions/SyncIndicators/function.json")).unwrap(),
    )
    .unwrap();
    let binding = &function["bindings"][0];
    assert_eq!(binding["type"], "timerTrigger");
    assert_eq!(binding["schedule"], "%TIMER_SCHEDULE%");
    assert_eq!(binding["runOnStartup"], false);
    // The folder name is the path the host posts to.
    assert_eq!(mati_sentinel::handler::FUNCTION, "SyncIndicators");
}

#[test]
fn the_local_settings_example_lists_every_setting_the_code_reads() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/functions/local.settings.json.example"
    ))
    .unwrap();
    let example: serde_json::Value = serde_json::from_str(&text).unwrap();
    let values = example["Values"].as_object().unwrap();
    for name in mati_sentinel::config::SETTINGS {
        assert!(
            values.contains_key(*name),
            "{name} missing from local.settings.json.example"
        );
    }
    assert_eq!(values["FUNCTIONS_WORKER_RUNTIME"], "custom");
    assert_eq!(values["AzureWebJobsStorage"], "UseDevelopmentStorage=true");
}
