//! D2: an iterable dataset prepared by the Accelerator on 2 processes, read to the end, against Python
//! Accelerate's same loop (`bench/py_dispatch.py`): `bench-dispatch dispatch|shard [--epochs N]`.
//!
//! The stream yields 65536 rows of 784 floats with an int64 label (MNIST-sized samples, cheap to
//! make, so the figure is the loader's: per-sample iteration, collation, dispatch or sharding, the copy to
//! the GPU). `dispatch` is Accelerate's default for iterable datasets (process 0 reads, `DataLoaderDispatcher`);
//! `shard` is `dispatch_batches=false` (every process reads the stream, `IterableDatasetShard`).

#[path = "report.rs"]
mod report;

use hasten::data::{IterableDataLoader, IterableDataset};
use hasten::tch::{Device, Kind, Tensor};
use hasten::{Accelerator, DataLoaderConfiguration};
use serde_json::json;
use std::time::Instant;

const SAMPLES: i64 = 65_536;
const BATCH: usize = 128;

/// The rows in host memory (tch tensors cannot be shared between threads, a dataset must be).
struct Rows {
    x: Vec<f32>,
    y: Vec<i64>,
}

impl IterableDataset for Rows {
    type Item = (Vec<f32>, i64);
    fn iter(&self, _epoch: u64) -> Box<dyn Iterator<Item = (Vec<f32>, i64)> + Send + '_> {
        Box::new(
            (0..SAMPLES as usize).map(|i| (self.x[i * 784..(i + 1) * 784].to_vec(), self.y[i])),
        )
    }
    fn known_len(&self) -> Option<usize> {
        Some(SAMPLES as usize)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_else(|| "dispatch".into());
    let epochs: usize = args
        .iter()
        .position(|a| a == "--epochs")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(3), |s| s.parse())?;
    let mut acc = Accelerator::builder()
        .dataloader_config(DataLoaderConfiguration {
            dispatch_batches: Some(mode == "dispatch"),
            ..Default::default()
        })
        .build()?;
    hasten::tch::manual_seed(0);
    let rows = Rows {
        x: Vec::<f32>::try_from(Tensor::randn([SAMPLES * 784], (Kind::Float, Device::Cpu)))?,
        y: Vec::<i64>::try_from(Tensor::randint(10, [SAMPLES], (Kind::Int64, Device::Cpu)))?,
    };
    // Collation as PyTorch's default does it: the samples' rows stacked, the labels in one tensor.
    let loader = IterableDataLoader::with_collate(rows, BATCH, |items: Vec<(Vec<f32>, i64)>| {
        let n = items.len() as i64;
        let (mut x, mut y) = (
            Vec::with_capacity(items.len() * 784),
            Vec::with_capacity(items.len()),
        );
        for (row, label) in items {
            x.extend_from_slice(&row);
            y.push(label);
        }
        Ok((
            Tensor::from_slice(&x).view([n, 784]),
            Tensor::from_slice(&y),
        ))
    });
    let dl = acc.prepare_iterable_data_loader(loader)?;
    for epoch in 0..=epochs {
        acc.wait_for_everyone()?;
        let t0 = Instant::now();
        let (mut batches, mut checksum) = (0usize, 0i64);
        for batch in dl.iter()? {
            let (x, y) = batch?;
            batches += 1;
            // Touch the data on the device so the copy has really happened.
            checksum += y.sum(Kind::Int64).int64_value(&[]) + x.size()[0];
        }
        acc.wait_for_everyone()?;
        let s = t0.elapsed().as_secs_f64();
        if acc.is_main_process() && epoch > 0 {
            report::emit(json!({
                "bench": "D2", "side": "hasten", "mode": mode, "epoch": epoch,
                "s": s, "samples_per_s": SAMPLES as f64 / s, "batches_per_rank": batches,
                "checksum_rank0": checksum,
            }));
        }
    }
    Ok(())
}
