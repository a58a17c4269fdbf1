//! Render every kernel a spec needs on any device into a directory (one `<key>.cu` each), for
//! looking at a kernel or compiling it by hand (scripts/nvrtc_check.py). The catalog's
//! kernels come from `regen-kernels`; this renders any spec.
//!
//! `cargo run -p attention-codegen --example render_spec -- "<spec>" OUT_DIR [dtype] [--backward]`
//! (`dtype`: `bf16` (default) or `f16`; `--backward`: also the training kernels of
//! `registry::backward_kernels_for`, for specs without an output gate).

use std::process::ExitCode;

use attention_codegen::registry::{backward_kernels_for, kernels_for_spec_head_dims, Target};
use attention_codegen::render::render_all;
use attention_codegen::spec::{AttentionSpec, DType};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: render_spec \"<spec>\" OUT_DIR [bf16|f16] [--backward]");
        return ExitCode::FAILURE;
    }
    let run = || -> Result<usize, String> {
        let mut spec: AttentionSpec = args[0].parse().map_err(|e| format!("{e}"))?;
        let flags = &args[2..];
        if flags.iter().any(|a| a == "f16") {
            spec.dtype = DType::F16;
        }
        let mut configs =
            kernels_for_spec_head_dims(&spec, Target::AnyDevice).map_err(|e| e.to_string())?;
        if flags.iter().any(|a| a == "--backward") {
            for &hd in &spec.head_dims {
                for c in
                    backward_kernels_for(&spec, hd, Target::AnyDevice).map_err(|e| e.to_string())?
                {
                    if !configs.iter().any(|o| o.key() == c.key()) {
                        configs.push(c);
                    }
                }
            }
        }
        let sources = render_all(&configs).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&args[1]).map_err(|e| e.to_string())?;
        for s in &sources {
            std::fs::write(format!("{}/{}.cu", args[1], s.key), &s.source)
                .map_err(|e| e.to_string())?;
        }
        Ok(sources.len())
    };
    match run() {
        Ok(n) => {
            println!("{n} kernels written to {}", args[1]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("render_spec: {e}");
            ExitCode::FAILURE
        }
    }
}
