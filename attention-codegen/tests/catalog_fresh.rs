//! `kernels-generated/` matches a fresh render of the catalog (no missing, extra or changed
//! file). Regenerate with `cargo run -p attention-codegen --bin regen-kernels`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use attention_codegen::catalog::generated_files;

const REGEN: &str = "cargo run -p attention-codegen --bin regen-kernels";

#[test]
fn kernels_generated_is_fresh() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("kernels-generated");
    let want: BTreeMap<String, String> = generated_files()
        .expect("catalog renders")
        .into_iter()
        .collect();
    let mut have: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.path().is_file() {
                let name = e.file_name().to_string_lossy().into_owned();
                have.insert(name, std::fs::read(e.path()).unwrap_or_default());
            }
        }
    }
    let mut problems = Vec::new();
    for (name, text) in &want {
        match have.get(name) {
            None => problems.push(format!("missing: {name}")),
            Some(bytes) if bytes != text.as_bytes() => problems.push(format!("changed: {name}")),
            Some(_) => {}
        }
    }
    for name in have.keys().filter(|n| !want.contains_key(*n)) {
        problems.push(format!("extra: {name}"));
    }
    assert!(
        problems.is_empty(),
        "kernels-generated/ ({}) is stale; regenerate it with `{REGEN}`:\n  {}",
        dir.display(),
        problems.join("\n  ")
    );
}
