//! Regenerate `kernels-generated/` from the catalog:
//! `cargo run -p attention-codegen --bin regen-kernels`.
//!
//! Writes `<key>.cu` for every catalog kernel plus `MANIFEST.txt`, and removes files of the
//! folder that the catalog no longer produces.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

fn run() -> Result<(), String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("kernels-generated");
    let files = attention_codegen::catalog::generated_files().map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let wanted: BTreeSet<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains(name.as_str()) && entry.path().is_file() {
            std::fs::remove_file(entry.path())
                .map_err(|e| format!("removing {}: {e}", entry.path().display()))?;
            println!("removed {name}");
        }
    }
    let mut changed = 0;
    for (name, text) in &files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
            changed += 1;
        }
    }
    println!(
        "kernels-generated: {} files ({} kernels), {changed} written",
        files.len(),
        files.len() - 1
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regen-kernels: {e}");
            ExitCode::FAILURE
        }
    }
}
