//! `hasten-estimate-memory MODEL [--dtypes D...]`: Accelerate's `estimate-memory` table for a local model.
//! `hasten estimate-memory` runs this program, which links libtorch, so that `hasten` itself does not.
//!
//! MODEL is a safetensors file, a sharded checkpoint's `*.index.json`, a folder holding either, or a JSON
//! description (`{"tensors": {...}, "modules": {...}, "no_split_module_classes": [...]}`). Only headers
//! are read, never weights, so a 100 GB checkpoint costs milliseconds.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// Accelerate's `estimate-memory`: the memory a model needs to load, and to train with Adam, per dtype.
#[derive(Parser)]
#[command(name = "hasten estimate-memory")]
struct Args {
    /// A safetensors file, a sharded checkpoint's `*.index.json`, a folder holding either, or a JSON model
    /// description.
    model: PathBuf,
    /// The dtypes to show (default: Accelerate's float32 float16 int8 int4).
    #[arg(long, num_args = 1.., value_parser = ["float32", "float16", "bfloat16", "int8", "int4"])]
    dtypes: Vec<String>,
}

fn main() -> ExitCode {
    let Args { model, mut dtypes } = Args::parse();
    if dtypes.is_empty() {
        dtypes = ["float32", "float16", "int8", "int4"]
            .map(String::from)
            .to_vec();
    }
    let name = model.to_string_lossy().into_owned();
    let is_description = name.ends_with(".json") && !name.ends_with(".index.json");
    let loaded = if is_description {
        hasten::big_modeling::ModelSkeleton::from_json_description(&model)
    } else {
        hasten::big_modeling::ModelSkeleton::from_safetensors(&model).map(|s| (s, Vec::new()))
    };
    match loaded {
        Ok((skeleton, no_split)) => {
            let dtypes: Vec<&str> = dtypes.iter().map(String::as_str).collect();
            let title = format!("Memory Usage for loading `{name}`");
            println!(
                "{}",
                hasten::big_modeling::estimate_memory_table(&skeleton, &no_split, &title, &dtypes)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hasten estimate-memory: {e}");
            ExitCode::FAILURE
        }
    }
}
