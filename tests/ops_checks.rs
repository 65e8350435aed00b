//! One body of checks for every collective operation, run on every backend: under `hasten launch` and
//! `notebook_launcher` on CPUs in CI, and over NCCL on the GPU machine. Expected values are Accelerate's
//! own test values (shared/oracle/accelerate_cases.md): process r holds `arange(P) + 1 + P*r`.

use hasten::tch::{Device, Kind, Tensor};
use hasten::{Error, ProcessGroup, ReduceOp, Reduction};
use std::collections::BTreeMap;

type Check = Result<(), String>;
type CheckFn = fn(&mut ProcessGroup, &Ctx) -> Check;

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        t.to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .flatten(0, -1),
    )
    .unwrap_or_default()
}

fn expect(t: &Tensor, want: &[f64], what: &str) -> Check {
    let got = values(t);
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

struct Ctx {
    p: usize,
    r: usize,
    device: Device,
}

impl Ctx {
    /// `arange(P) + 1 + P*rank` as f32 on this rank's device.
    fn mine(&self) -> Tensor {
        (Tensor::arange(self.p as i64, (Kind::Float, Device::Cpu)) + 1.0 + (self.p * self.r) as f64)
            .to_device(self.device)
    }
    fn range(&self, from: usize, to: usize) -> Vec<f64> {
        (from..to).map(|x| x as f64).collect()
    }
}

fn gather(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let out = g.gather(c.mine()).map_err(err)?;
    expect(&out, &c.range(1, c.p * c.p + 1), "gather")?;
    // Nested: a map and a tuple gather each tensor; 0-d tensors become 1-d.
    let mut m = BTreeMap::new();
    m.insert("a".to_owned(), c.mine());
    let scalar = Tensor::from(c.r as f32).to_device(c.device);
    let (m, s, label) = g.gather((m, scalar, "kept")).map_err(err)?;
    expect(&m["a"], &c.range(1, c.p * c.p + 1), "gather map")?;
    expect(&s, &c.range(0, c.p), "gather 0-d")?;
    if label != "kept" {
        return Err("non-tensor leaves must pass through".into());
    }
    // bf16 and int64 travel too.
    let bf = g.gather(c.mine().to_kind(Kind::BFloat16)).map_err(err)?;
    expect(&bf, &c.range(1, c.p * c.p + 1), "gather bf16")?;
    let ints = g.gather(c.mine().to_kind(Kind::Int64)).map_err(err)?;
    expect(&ints, &c.range(1, c.p * c.p + 1), "gather int64")
}

fn gather_object(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let out = g.gather_object(&[c.r]).map_err(err)?;
    if out != (0..c.p).collect::<Vec<_>>() {
        return Err(format!("gather_object: got {out:?}"));
    }
    let names = g.all_gather_object(&format!("rank-{}", c.r)).map_err(err)?;
    if names.len() != c.p || names[c.p - 1] != format!("rank-{}", c.p - 1) {
        return Err(format!("all_gather_object: got {names:?}"));
    }
    Ok(())
}

fn broadcast(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let out = g.broadcast_data(c.mine(), 0).map_err(err)?;
    expect(&out, &c.range(1, c.p + 1), "broadcast from 0")?;
    let last = c.p - 1;
    let out = g.broadcast_data(c.mine(), last).map_err(err)?;
    let want: Vec<f64> = (0..c.p).map(|i| (i + 1 + c.p * last) as f64).collect();
    expect(&out, &want, "broadcast from the last rank")?;
    let mut objects = vec![c.r * 10, c.r];
    g.broadcast_object_list(&mut objects, last).map_err(err)?;
    if objects != vec![last * 10, last] {
        return Err(format!("broadcast_object_list: got {objects:?}"));
    }
    Ok(())
}

fn reduce(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let p = c.p as f64;
    let sum: Vec<f64> = (0..c.p)
        .map(|i| (0..c.p).map(|r| (i + 1 + c.p * r) as f64).sum())
        .collect();
    expect(
        &g.reduce(c.mine(), Reduction::Sum, 1.0).map_err(err)?,
        &sum,
        "reduce sum",
    )?;
    let mean: Vec<f64> = sum.iter().map(|s| s / p).collect();
    expect(
        &g.reduce(c.mine(), Reduction::Mean, 1.0).map_err(err)?,
        &mean,
        "reduce mean",
    )?;
    let max: Vec<f64> = (0..c.p).map(|i| (i + 1 + c.p * (c.p - 1)) as f64).collect();
    expect(
        &g.reduce(c.mine(), Reduction::Max, 1.0).map_err(err)?,
        &max,
        "reduce max",
    )?;
    let scaled: Vec<f64> = sum.iter().map(|s| s * 0.5).collect();
    expect(
        &g.reduce(c.mine(), Reduction::Sum, 0.5).map_err(err)?,
        &scaled,
        "reduce scale",
    )?;
    expect(
        &g.reduce(c.mine(), Reduction::None, 1.0).map_err(err)?,
        &values(&c.mine()),
        "reduce none",
    )?;
    // all_reduce's other operations.
    let mut t = Tensor::from_slice(&[(c.r + 1) as f32]).to_device(c.device);
    g.all_reduce(&mut t, ReduceOp::Min).map_err(err)?;
    expect(&t, &[1.0], "all_reduce min")?;
    let mut t = Tensor::from_slice(&[(c.r + 1) as f64]).to_device(c.device);
    g.all_reduce(&mut t, ReduceOp::Product).map_err(err)?;
    let factorial: f64 = (1..=c.p).map(|x| x as f64).product();
    expect(&t, &[factorial], "all_reduce product")?;
    let mut ints = Tensor::from_slice(&[1i64]).to_device(c.device);
    if g.all_reduce(&mut ints, ReduceOp::Mean).is_ok() {
        return Err("a mean of integers must be refused".into());
    }
    Ok(())
}

fn reduce_scatter(g: &mut ProcessGroup, c: &Ctx) -> Check {
    // Every rank holds 0..2P (+ rank); rank r gets rows 2r, 2r+1 summed over ranks.
    let t = (Tensor::arange(2 * c.p as i64, (Kind::Float, Device::Cpu)) + c.r as f64)
        .to_device(c.device);
    let out = g.reduce_scatter(&t, ReduceOp::Sum).map_err(err)?;
    let base: f64 = (0..c.p).map(|r| r as f64).sum();
    let want: Vec<f64> = (0..2)
        .map(|k| ((2 * c.r + k) * c.p) as f64 + base)
        .collect();
    expect(&out, &want, "reduce_scatter")
}

fn pad_across_processes(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let len = if c.r == 0 { c.p + 1 } else { c.p };
    let t = Tensor::arange(len as i64, (Kind::Float, Device::Cpu)).to_device(c.device);
    let out = g.pad_across_processes(t, 0, 0.0, false).map_err(err)?;
    let mut want = c.range(0, len);
    want.resize(c.p + 1, 0.0);
    expect(&out, &want, "pad_across_processes")?;
    // pad_first puts the padding in front.
    let t = Tensor::arange(len as i64, (Kind::Float, Device::Cpu)).to_device(c.device);
    let out = g.pad_across_processes(t, 0, -1.0, true).map_err(err)?;
    let mut want = vec![-1.0; c.p + 1 - len];
    want.extend(c.range(0, len));
    expect(&out, &want, "pad_across_processes pad_first")?;
    // A dim outside the tensor's dimensions leaves it unchanged.
    let t = Tensor::ones([2, 3], (Kind::Float, c.device));
    let out = g.pad_across_processes(t, 2, 0.0, false).map_err(err)?;
    if out.size() != [2, 3] {
        return Err(format!(
            "pad outside dims changed the shape to {:?}",
            out.size()
        ));
    }
    Ok(())
}

/// Tensors large enough for the bulk paths (shared memory on one host, NCCL on GPUs).
fn large_tensors(g: &mut ProcessGroup, c: &Ctx) -> Check {
    const N: i64 = 600_000;
    let p = c.p as f64;
    let base = || Tensor::arange(N, (Kind::Float, Device::Cpu)).to_device(c.device);
    let at = |t: &Tensor, i: i64| t.to_device(Device::Cpu).double_value(&[i]);
    let mut t = base() + c.r as f64;
    g.all_reduce(&mut t, ReduceOp::Sum).map_err(err)?;
    let rank_sum: f64 = (0..c.p).map(|r| r as f64).sum();
    for i in [0, 1, N / 2, N - 1] {
        let want = i as f64 * p + rank_sum;
        if at(&t, i) != want {
            return Err(format!("large sum at {i}: got {}, want {want}", at(&t, i)));
        }
    }
    let mut t = base() + c.r as f64;
    g.all_reduce(&mut t, ReduceOp::Max).map_err(err)?;
    if at(&t, N - 1) != (N - 1) as f64 + (c.p - 1) as f64 {
        return Err(format!("large max: got {}", at(&t, N - 1)));
    }
    let mut t = base() + c.r as f64;
    g.all_reduce(&mut t, ReduceOp::Mean).map_err(err)?;
    if (at(&t, 7) - (7.0 + rank_sum / p)).abs() > 1e-3 {
        return Err(format!("large mean: got {}", at(&t, 7)));
    }
    let mut t = base() + c.r as f64;
    g.broadcast(&mut t, c.p - 1).map_err(err)?;
    if at(&t, 3) != 3.0 + (c.p - 1) as f64 {
        return Err(format!("large broadcast: got {}", at(&t, 3)));
    }
    let gathered = g.gather(base() + c.r as f64).map_err(err)?;
    if gathered.size() != [N * c.p as i64] {
        return Err(format!("large gather shape {:?}", gathered.size()));
    }
    for r in 0..c.p as i64 {
        if at(&gathered, r * N + 5) != 5.0 + r as f64 {
            return Err(format!("large gather: rank {r}'s part is wrong"));
        }
    }
    Ok(())
}

/// Without debug mode, ranks passing different sizes to a CPU collective all get an error (not a hang).
/// Run last: the group may be unusable afterwards. (On NCCL this is undefined, as in PyTorch.)
fn mismatch_without_debug(g: &mut ProcessGroup, c: &Ctx) -> Check {
    if c.device != Device::Cpu {
        return Ok(());
    }
    let n = if c.r == 0 { 600_000 } else { 600_001 };
    let mut t = Tensor::ones([n], (Kind::Float, Device::Cpu));
    match g.all_reduce(&mut t, ReduceOp::Sum) {
        Err(e) if e.to_string().contains("same shape and dtype") => Ok(()),
        other => Err(format!("mismatched sizes gave {other:?}")),
    }
}

fn debug_mode(g: &mut ProcessGroup, c: &Ctx) -> Check {
    g.set_debug(true);
    let result = (|| {
        // Matching shapes pass.
        expect(
            &g.gather(c.mine()).map_err(err)?,
            &c.range(1, c.p * c.p + 1),
            "debug gather",
        )?;
        let shape: Vec<i64> = if c.r == 0 { vec![1, 5] } else { vec![1, 2, 5] };
        let t = Tensor::zeros(&shape, (Kind::Float, c.device));
        for (op, outcome) in [
            (
                "reduce",
                g.reduce(t.shallow_clone(), Reduction::Sum, 1.0).map(drop),
            ),
            (
                "broadcast",
                g.broadcast_data(t.shallow_clone(), 0).map(drop),
            ),
            ("gather", g.gather(t.shallow_clone()).map(drop)),
        ] {
            match outcome {
                Err(e @ Error::RankShapeMismatch { .. }) => {
                    if let Error::RankShapeMismatch { shapes, .. } = &e {
                        // The shapes as data: rank 0's and rank 1's tensors.
                        if shapes.len() != c.p
                            || shapes[0] != [vec![1, 5]]
                            || shapes[1] != [vec![1, 2, 5]]
                        {
                            return Err(format!("{op}: per-rank shapes {shapes:?}"));
                        }
                    }
                    let message = e.to_string();
                    for needle in [
                        "Cannot apply desired operation due to shape mismatches".to_owned(),
                        format!("Operation: `hasten::ops::{op}`"),
                        "  - Process 0: [1, 5]".to_owned(),
                        "  - Process 1: [1, 2, 5]".to_owned(),
                    ] {
                        if !message.contains(&needle) {
                            return Err(format!("{op}: message lacks {needle:?}:\n{message}"));
                        }
                    }
                }
                other => return Err(format!("{op} with mismatched shapes gave {other:?}")),
            }
        }
        let shape: Vec<i64> = if c.r == 0 { vec![1, 5] } else { vec![1, 1, 6] };
        let t = Tensor::zeros(&shape, (Kind::Float, c.device));
        match g.pad_across_processes(t, 0, 0.0, false) {
            Err(Error::ChainedOperation {
                op: "pad_across_processes",
                source,
            }) => {
                if !matches!(*source, Error::RankShapeMismatch { .. }) {
                    return Err(format!("pad chained the wrong error: {source}"));
                }
            }
            other => {
                return Err(format!(
                    "pad_across_processes with mismatched ranks gave {other:?}"
                ));
            }
        }
        // A tensor on the wrong device type is named, on every rank.
        if c.device != Device::Cpu {
            let wrong = if c.r == 1 {
                c.mine().to_device(Device::Cpu)
            } else {
                c.mine()
            };
            match g.gather(wrong) {
                Err(Error::RankDeviceMismatch {
                    rank: 1, ref found, ..
                }) if found == "cpu" => {}
                other => return Err(format!("a CPU tensor on a GPU run gave {other:?}")),
            }
        }
        Ok(())
    })();
    g.set_debug(false);
    result
}

/// Every rank computes on a GPU of its own (by PCI address), whether the launcher bound each rank to one
/// GPU (it then sees only that one, as `cuda:0`) or showed it all of them (it takes `cuda:local_rank`).
fn distinct_gpus(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let Device::Cuda(index) = c.device else {
        return Err(format!("a rank using NCCL computes on {:?}", c.device));
    };
    let gpus = hasten::utils::cuda_devices().map_err(err)?;
    let mine = gpus
        .get(index)
        .ok_or_else(|| format!("cuda:{index} is not among the {} visible GPUs", gpus.len()))?;
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "(unset)".into());
    println!(
        "rank {} computes on cuda:{index} = GPU {} ({} visible, CUDA_VISIBLE_DEVICES={visible})",
        c.r,
        mine.pci_bus_id,
        gpus.len()
    );
    let all = g.all_gather_object(&mine.pci_bus_id).map_err(err)?;
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    if unique.len() == all.len() {
        Ok(())
    } else {
        Err(format!("ranks share GPUs: {all:?}"))
    }
}

/// Runs every check on this rank, prints one line per check and returns the number that failed.
/// Collectives within the groups of a split: ranks by parity (on 2 ranks, two groups of one), every
/// group at once; on GPUs each group has its own NCCL communicator. A split that leaves a rank out, or
/// that ranks describe differently, fails on every rank, naming it.
fn split(g: &mut ProcessGroup, c: &Ctx) -> Check {
    let groups: Vec<Vec<usize>> = (0..2.min(c.p))
        .map(|parity| (parity..c.p).step_by(2).collect())
        .collect();
    let mut part = g.split(groups.clone()).map_err(err)?;
    let members: Vec<usize> = part.members().to_vec();
    if !members.contains(&c.r) || members[part.index()] != c.r {
        return Err(format!(
            "rank {} placed in {members:?} at {}",
            c.r,
            part.index()
        ));
    }
    // Sum of the members' `mine`: element i is sum over members m of (i + 1 + P*m).
    let mut t = c.mine();
    g.all_reduce_within(&mut part, &mut t, ReduceOp::Sum)
        .map_err(err)?;
    let n = members.len() as f64;
    let base: f64 = members.iter().map(|&m| (c.p * m) as f64).sum();
    let want: Vec<f64> = (0..c.p).map(|i| n * (i as f64 + 1.0) + base).collect();
    expect(&t, &want, "all_reduce_within")?;
    let gathered = g.all_gather_cat_within(&mut part, &c.mine()).map_err(err)?;
    let want: Vec<f64> = members
        .iter()
        .flat_map(|&m| (0..c.p).map(move |i| (i + 1 + c.p * m) as f64))
        .collect();
    expect(&gathered, &want, "all_gather_cat_within")?;
    // Each member's share (by its place in the group) of the group's sum: rank r holds
    // (r + 1) · (1, 2, …, 2n); member k gets elements 2k and 2k + 1.
    let n_rows = members.len() as i64 * 2;
    let rows = (Tensor::arange(n_rows, (Kind::Float, Device::Cpu)) + 1.0) * (c.r as f64 + 1.0);
    let share = g
        .reduce_scatter_within(&mut part, &rows.to_device(c.device), ReduceOp::Sum)
        .map_err(err)?;
    let total: f64 = members.iter().map(|&m| m as f64 + 1.0).sum();
    let k = part.index() as f64;
    expect(
        &share,
        &[total * (2.0 * k + 1.0), total * (2.0 * k + 2.0)],
        "reduce_scatter_within",
    )?;
    // The whole group still works after the split.
    let mut one = Tensor::ones([1], (Kind::Float, c.device));
    g.all_reduce(&mut one, ReduceOp::Sum).map_err(err)?;
    expect(&one, &[c.p as f64], "all_reduce after a split")?;
    if c.p > 1 {
        match g.split(vec![(1..c.p).collect()]) {
            Err(e) if e.to_string().contains("leaves out rank 0") => {}
            other => return Err(format!("a split without rank 0: {other:?}")),
        }
    }
    Ok(())
}

pub fn run_ops_checks(g: &mut ProcessGroup) -> usize {
    let c = Ctx {
        p: g.world_size(),
        r: g.rank(),
        device: g.state().device,
    };
    let checks: [(&str, CheckFn); 10] = [
        ("gather", gather),
        ("gather_object", gather_object),
        ("broadcast", broadcast),
        ("reduce", reduce),
        ("reduce_scatter", reduce_scatter),
        ("pad_across_processes", pad_across_processes),
        ("large_tensors", large_tensors),
        ("split", split),
        ("debug_mode", debug_mode),
        ("mismatch_without_debug", mismatch_without_debug),
    ];
    let mut failed = 0;
    let total = checks.len() + 2 * usize::from(g.uses_nccl());
    if g.uses_nccl() {
        // A large collective waits for NCCL; the small one after it lets the ranks agree to switch, so
        // every check below runs on NCCL rather than on the TCP path used while NCCL starts.
        let mut big = Tensor::ones([1 << 20], (Kind::Float, c.device));
        let mut small = Tensor::ones([1], (Kind::Float, c.device));
        let warm = g
            .all_reduce(&mut big, ReduceOp::Sum)
            .and_then(|_| g.all_reduce(&mut small, ReduceOp::Sum));
        match (warm, g.nccl_active()) {
            (Ok(()), true) => println!("check nccl_switch: ok"),
            (outcome, active) => {
                failed += 1;
                println!("check nccl_switch: FAILED: {outcome:?}, active {active}");
            }
        }
    }
    if g.uses_nccl() {
        match distinct_gpus(g, &c) {
            Ok(()) => println!("check distinct_gpus: ok"),
            Err(e) => {
                failed += 1;
                println!("check distinct_gpus: FAILED: {e}");
            }
        }
    }
    for (name, check) in checks {
        match check(g, &c) {
            Ok(()) => println!("check {name}: ok"),
            Err(e) => {
                failed += 1;
                println!("check {name}: FAILED: {e}");
            }
        }
    }
    let backend = if g.nccl_active() { "nccl" } else { "cpu" };
    println!(
        "ops checks on rank {} ({backend}, {} processes): {} passed, {failed} failed",
        c.r,
        c.p,
        total - failed
    );
    failed
}
