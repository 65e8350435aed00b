//! The `save-loop DIR MODE` mode of `hasten-test-training`: saves checkpoints for ever, each with its
//! weights set to the save's number, so a test can kill it at random moments and check that a whole
//! checkpoint always remains (issue 15). MODE: `same` (the same folder every time), `limit1` / `limit2`
//! (automatic naming with that total_limit). After the first save it prints `saved 0`.

use hasten::tch::nn;
use hasten::tch::{Device, Kind};
use hasten::{Accelerator, ProjectConfiguration};
use std::io::Write;
use std::path::Path;

/// The model both sides build: 1.6 MB of weights, so a save takes long enough to be interrupted.
pub fn model(vs: &nn::VarStore) {
    let root = vs.root();
    let _w = root.var("w", &[400, 1024], nn::Init::Const(0.0));
    let _b = root.var("b", &[1024], nn::Init::Const(0.0));
}

/// The Accelerator of `mode` saving under `dir`.
pub fn accelerator(dir: &Path, mode: &str) -> hasten::Result<Accelerator> {
    let limit = match mode {
        "limit1" => Some(1),
        "limit2" => Some(2),
        _ => None,
    };
    Accelerator::builder()
        .cpu(true)
        .project_config(ProjectConfiguration {
            project_dir: Some(dir.to_owned()),
            automatic_checkpoint_naming: limit.is_some(),
            total_limit: limit,
            ..Default::default()
        })
        .build()
}

pub fn save_loop(dir: &Path, mode: &str) -> Result<(), String> {
    let mut acc = accelerator(dir, mode).map_err(|e| e.to_string())?;
    let vs = nn::VarStore::new(Device::Cpu);
    model(&vs);
    let model = acc.prepare_model((), vs).map_err(|e| e.to_string())?;
    let vs = model.var_store();
    let target = dir.join("ckpt");
    for i in 0u64.. {
        hasten::tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let _ = v.fill_(i as f64);
            }
        });
        let out = (mode == "same").then_some(target.as_path());
        acc.save_state(out).map_err(|e| e.to_string())?;
        if i == 0 {
            println!("saved 0");
            let _ = std::io::stdout().flush();
        }
    }
    Ok(())
}

/// Loads what a killed `save-loop` left (the same model and configuration) and returns the weights'
/// value, which must be one number everywhere: a whole checkpoint. (Used by tests/reliability.rs, which
/// includes this file; the binary itself only saves.)
#[allow(dead_code)]
pub fn load_after_kill(dir: &Path, mode: &str) -> Result<f64, String> {
    let mut acc = accelerator(dir, mode).map_err(|e| e.to_string())?;
    let vs = nn::VarStore::new(Device::Cpu);
    model(&vs);
    let model = acc.prepare_model((), vs).map_err(|e| e.to_string())?;
    let vs = model.var_store();
    let input = (mode == "same").then(|| dir.join("ckpt"));
    acc.load_state(input.as_deref())
        .map_err(|e| e.to_string())?;
    let values: Vec<f64> = vs
        .variables()
        .values()
        .flat_map(|v| {
            Vec::<f64>::try_from(v.to_kind(Kind::Double).flatten(0, -1)).unwrap_or_default()
        })
        .collect();
    let first = *values.first().ok_or("no weights")?;
    if values.iter().any(|v| *v != first) {
        return Err(format!(
            "a mixed checkpoint: weights from different saves ({first} and others)"
        ));
    }
    Ok(first)
}
