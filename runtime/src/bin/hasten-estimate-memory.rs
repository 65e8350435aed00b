//! `hasten-estimate-memory MODEL [--dtypes D...]`: Accelerate's `estimate-memory` table for a local model.
//! `hasten estimate-memory` runs this program, which links libtorch, so that `hasten` itself does not.
//!
//! MODEL is a safetensors file, a sharded checkpoint's `*.index.json`, a folder holding either, or a JSON
//! description (`{"tensors": {...}, "modules": {...}, "no_split_module_classes": [...]}`). Only headers
//! are read, never weights, so a 100 GB checkpoint costs milliseconds.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str =
    "usage: hasten estimate-memory MODEL [--dtypes float32 float16 bfloat16 int8 int4]";
const KNOWN: [&str; 5] = ["float32", "float16", "bfloat16", "int8", "int4"];

fn main() -> ExitCode {
    let mut model: Option<PathBuf> = None;
    let mut dtypes: Vec<String> = Vec::new();
    let mut in_dtypes = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--dtypes" => in_dtypes = true,
            _ if arg.starts_with("--") => {
                eprintln!("hasten estimate-memory: unknown option {arg}\n{USAGE}");
                return ExitCode::from(2);
            }
            _ if in_dtypes => dtypes.push(arg),
            _ if model.is_none() => model = Some(PathBuf::from(arg)),
            _ => {
                eprintln!("hasten estimate-memory: unexpected argument {arg}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(model) = model else {
        eprintln!("hasten estimate-memory: no MODEL given\n{USAGE}");
        return ExitCode::from(2);
    };
    if dtypes.is_empty() {
        // Accelerate's default set.
        dtypes = ["float32", "float16", "int8", "int4"]
            .map(String::from)
            .to_vec();
    }
    if let Some(bad) = dtypes.iter().find(|d| !KNOWN.contains(&d.as_str())) {
        eprintln!(
            "hasten estimate-memory: unknown dtype {bad:?} (choose from {})",
            KNOWN.join(", ")
        );
        return ExitCode::from(2);
    }
    let name = model.to_string_lossy().into_owned();
    let is_description = name.ends_with(".json") && !name.ends_with(".index.json");
    let loaded = if is_description {
        hasten::ModelSkeleton::from_json_description(&model)
    } else {
        hasten::ModelSkeleton::from_safetensors(&model).map(|s| (s, Vec::new()))
    };
    match loaded {
        Ok((skeleton, no_split)) => {
            let dtypes: Vec<&str> = dtypes.iter().map(String::as_str).collect();
            let title = format!("Memory Usage for loading `{name}`");
            println!(
                "{}",
                hasten::estimate_memory_table(&skeleton, &no_split, &title, &dtypes)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hasten estimate-memory: {e}");
            ExitCode::FAILURE
        }
    }
}
