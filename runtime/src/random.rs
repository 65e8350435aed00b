//! Seeding: one call seeds every generator hasten uses.

use crate::{EnvContract, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::{Mutex, MutexGuard};

/// hasten's own generator, the counterpart of Python's `random` module: samplers and host-side shuffles
/// draw from it. Process-wide like libtorch's default generators, which `set_seed` seeds alongside it.
static HOST_RNG: Mutex<Option<ChaCha8Rng>> = Mutex::new(None);

/// Locks and returns hasten's host-side generator (seeded from the OS until [`set_seed`] is called).
pub fn host_rng() -> HostRng {
    let mut guard = HOST_RNG.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        *guard = Some(ChaCha8Rng::from_os_rng());
    }
    HostRng(guard)
}

/// A locked handle on hasten's host generator; use it as any [`rand::RngCore`].
pub struct HostRng(MutexGuard<'static, Option<ChaCha8Rng>>);

impl HostRng {
    fn rng(&mut self) -> &mut ChaCha8Rng {
        self.0.get_or_insert_with(ChaCha8Rng::from_os_rng)
    }
}

impl rand::RngCore for HostRng {
    fn next_u32(&mut self) -> u32 {
        self.rng().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.rng().next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.rng().fill_bytes(dest)
    }
}

/// Seeds hasten's host generator, libtorch's CPU generator and, where CUDA is available, every CUDA
/// generator. With `device_specific`, the seed is offset by the process's global rank (read from the
/// environment contract) so each rank draws differently, as in Accelerate.
///
/// Accelerate's `deterministic=True` (torch.use_deterministic_algorithms) has no tch binding and is not
/// offered.
pub fn set_seed(seed: u64, device_specific: bool) -> Result<()> {
    // Load libtorch's CUDA half before tch::manual_seed: libtorch caches its CUDA hooks on first use, so
    // seeding first (the usual first line of a program) would leave CUDA unavailable for good.
    crate::libtorch();
    let seed = if device_specific {
        seed.wrapping_add(EnvContract::from_env()?.rank as u64)
    } else {
        seed
    };
    *HOST_RNG.lock().unwrap_or_else(|e| e.into_inner()) = Some(ChaCha8Rng::seed_from_u64(seed));
    // libtorch takes a signed seed; the bit pattern is what matters.
    tch::manual_seed(seed as i64);
    if crate::is_cuda_available() {
        tch::Cuda::manual_seed_all(seed);
    }
    Ok(())
}

/// hasten's host generator state: seed (32 bytes), stream (8), word position (16).
fn host_state() -> Vec<u8> {
    let mut host = host_rng();
    let rng = host.rng();
    let mut bytes = rng.get_seed().to_vec();
    bytes.extend_from_slice(&rng.get_stream().to_le_bytes());
    bytes.extend_from_slice(&rng.get_word_pos().to_le_bytes());
    bytes
}

fn set_host_state(bytes: &[u8]) -> Result<()> {
    if bytes.len() != 56 {
        return Err(crate::Error::InvalidValue {
            name: "hasten".into(),
            detail: format!(
                "expected 56 bytes of generator state, found {}",
                bytes.len()
            ),
        });
    }
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&bytes[..32]);
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(u64::from_le_bytes(
        bytes[32..40].try_into().unwrap_or_default(),
    ));
    rng.set_word_pos(u128::from_le_bytes(
        bytes[40..56].try_into().unwrap_or_default(),
    ));
    *HOST_RNG.lock().unwrap_or_else(|e| e.into_inner()) = Some(rng);
    Ok(())
}

/// The state of libtorch's default generator of `device` (the CPU, or a CUDA device).
pub(crate) fn torch_state(device: tch::Device) -> Result<tch::Tensor> {
    crate::libtorch();
    let (device_type, index) = match device {
        tch::Device::Cuda(i) => (1, i as i32),
        _ => (0, 0),
    };
    crate::shim::rng_get_state(device_type, index).ok_or_else(|| crate::Error::DeviceUnavailable {
        detail: format!("libtorch could not read the {device:?} generator's state"),
    })
}

/// Sets libtorch's default generator of `device` to `state` (checked: a 1-D uint8 tensor).
pub(crate) fn set_torch_state(device: tch::Device, name: &str, state: &tch::Tensor) -> Result<()> {
    let bad = |detail: &str| crate::Error::InvalidValue {
        name: name.to_owned(),
        detail: detail.to_owned(),
    };
    if state.kind() != tch::Kind::Uint8 || state.dim() != 1 {
        return Err(bad("a generator state is a 1-D uint8 tensor"));
    }
    let (device_type, index) = match device {
        tch::Device::Cuda(i) => (1, i as i32),
        _ => (0, 0),
    };
    if crate::shim::rng_set_state(device_type, index, state) != 0 {
        return Err(bad("libtorch refused this state (printed above)"));
    }
    Ok(())
}

fn visible_gpus() -> Vec<tch::Device> {
    if crate::is_cuda_available() {
        (0..tch::Cuda::device_count())
            .map(|i| tch::Device::Cuda(i as usize))
            .collect()
    } else {
        Vec::new()
    }
}

/// The state of every generator this process draws from, as named uint8 tensors (what `save_state`
/// writes per process): `hasten` (the host generator: seed, stream, word position), `torch_cpu`, and
/// `torch_cuda_{i}` per visible GPU.
pub fn rng_states() -> Result<Vec<(String, tch::Tensor)>> {
    crate::libtorch();
    let mut out = vec![
        ("hasten".to_owned(), tch::Tensor::from_slice(&host_state())),
        ("torch_cpu".to_owned(), torch_state(tch::Device::Cpu)?),
    ];
    for gpu in visible_gpus() {
        if let tch::Device::Cuda(i) = gpu {
            out.push((format!("torch_cuda_{i}"), torch_state(gpu)?));
        }
    }
    Ok(out)
}

/// Restores generator states from [`rng_states`]' output. Every state is checked before any is set; a
/// missing or malformed one is an error naming it.
pub fn set_rng_states(states: &[(String, tch::Tensor)]) -> Result<()> {
    crate::libtorch();
    let find = |name: &str| {
        states
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| crate::Error::InvalidValue {
                name: name.to_owned(),
                detail: "this generator's state is missing".into(),
            })
    };
    let host =
        Vec::<u8>::try_from(find("hasten")?).map_err(|e| crate::Error::torch("rng state", e))?;
    let mut torch = vec![(tch::Device::Cpu, "torch_cpu".to_owned())];
    for gpu in visible_gpus() {
        if let tch::Device::Cuda(i) = gpu {
            torch.push((gpu, format!("torch_cuda_{i}")));
        }
    }
    if host.len() != 56 {
        return Err(crate::Error::InvalidValue {
            name: "hasten".into(),
            detail: format!("expected 56 bytes of generator state, found {}", host.len()),
        });
    }
    let mut checked = Vec::new();
    for (device, name) in torch {
        let state = find(&name)?;
        if state.kind() != tch::Kind::Uint8 || state.dim() != 1 {
            return Err(crate::Error::InvalidValue {
                name,
                detail: "a generator state is a 1-D uint8 tensor".into(),
            });
        }
        checked.push((device, name, state));
    }
    for (device, name, state) in checked {
        set_torch_state(device, &name, state)?;
    }
    set_host_state(&host)
}

/// Rank 0's generator states (hasten's, libtorch's CPU one, and its GPU's) copied to every rank — the
/// GPU state onto each rank's own GPU — as Accelerate's `synchronize_rng_states`.
pub(crate) fn synchronize_rng_states(group: &mut crate::ProcessGroup) -> Result<()> {
    synchronize_rng_types(group, &[crate::RNGType::Torch, crate::RNGType::Cuda])
}

/// Rank 0's states of the generators named by `types` copied to every rank: `torch` is libtorch's CPU
/// generator and hasten's host one, `cuda` this rank's GPU's. `generator` needs nothing (hasten's samplers
/// draw from their seed and epoch, the same on every rank); the other accelerators' types do not apply.
pub(crate) fn synchronize_rng_types(
    group: &mut crate::ProcessGroup,
    types: &[crate::RNGType],
) -> Result<()> {
    let device = group.state().device;
    let torch = types.contains(&crate::RNGType::Torch);
    let cuda = types.contains(&crate::RNGType::Cuda) && device.is_cuda();
    if !(torch || cuda) || group.world_size() == 1 {
        return Ok(());
    }
    let bytes =
        |d| Vec::<u8>::try_from(torch_state(d)?).map_err(|e| crate::Error::torch("rng state", e));
    // [host, libtorch CPU, libtorch CUDA]; empty where not synchronised.
    let mut states: Vec<Vec<u8>> = Vec::new();
    if group.rank() == 0 {
        states.push(if torch { host_state() } else { Vec::new() });
        states.push(if torch {
            bytes(tch::Device::Cpu)?
        } else {
            Vec::new()
        });
        states.push(if cuda { bytes(device)? } else { Vec::new() });
    }
    group.broadcast_object_list(&mut states, 0)?;
    if group.rank() == 0 {
        return Ok(());
    }
    let state = |i: usize| states.get(i).filter(|s| !s.is_empty());
    if let Some(s) = state(1) {
        set_torch_state(tch::Device::Cpu, "torch_cpu", &tch::Tensor::from_slice(s))?;
    }
    if let Some(s) = state(2) {
        set_torch_state(device, "torch_cuda", &tch::Tensor::from_slice(s))?;
    }
    match state(0) {
        Some(s) => set_host_state(s),
        None => Ok(()),
    }
}

/// Runs `draw` (collective: every rank calls it) with libtorch's generators — the CPU one and this
/// rank's GPU's — holding rank 0's states, so every rank draws what rank 0 draws. After it, a rank whose
/// states were rank 0's already (every rank seeded alike) keeps the advanced states, as if it had drawn
/// alone; any other (seeded per device) gets its own back. hasten's host generator is not involved.
pub(crate) fn draw_as_rank_0<R>(
    group: &mut crate::ProcessGroup,
    draw: impl FnOnce() -> Result<R>,
) -> Result<R> {
    let device = group.state().device;
    let devices: Vec<tch::Device> = std::iter::once(tch::Device::Cpu)
        .chain(device.is_cuda().then_some(device))
        .collect();
    let own = devices
        .iter()
        .map(|d| {
            Vec::<u8>::try_from(torch_state(*d)?).map_err(|e| crate::Error::torch("rng state", e))
        })
        .collect::<Result<Vec<Vec<u8>>>>()?;
    let mut states = if group.rank() == 0 {
        own.clone()
    } else {
        Vec::new()
    };
    group.broadcast_object_list(&mut states, 0)?;
    let alike = states == own;
    let set = |all: &[Vec<u8>]| -> Result<()> {
        for (d, s) in devices.iter().zip(all) {
            set_torch_state(*d, "rank 0's generator", &tch::Tensor::from_slice(s))?;
        }
        Ok(())
    };
    if !alike {
        set(&states)?;
    }
    let drawn = draw();
    if !alike {
        set(&own)?;
    }
    drawn
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

    fn draw() -> (u64, Vec<f32>) {
        let host = host_rng().next_u64();
        let t = tch::Tensor::randn([4], (tch::Kind::Float, tch::Device::Cpu));
        (host, Vec::<f32>::try_from(&t).unwrap())
    }

    #[test]
    fn same_seed_same_draws_everywhere() {
        set_seed(42, false).unwrap();
        let a = draw();
        set_seed(42, false).unwrap();
        let b = draw();
        assert_eq!(a, b);
        set_seed(43, false).unwrap();
        let c = draw();
        assert_ne!(a.0, c.0);
        assert_ne!(a.1, c.1);
    }

    #[test]
    fn generator_states_round_trip() {
        set_seed(7, false).unwrap();
        let _ = draw();
        let saved = rng_states().unwrap();
        let a = draw();
        set_seed(99, false).unwrap();
        set_rng_states(&saved).unwrap();
        assert_eq!(
            draw(),
            a,
            "host and libtorch draws continue where they were saved"
        );
        let broken: Vec<(String, tch::Tensor)> = saved
            .iter()
            .filter(|(n, _)| n != "torch_cpu")
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let err = set_rng_states(&broken).unwrap_err().to_string();
        assert!(err.contains("torch_cpu"), "{err}");
    }

    #[test]
    fn device_specific_adds_the_rank() {
        set_seed(43, false).unwrap();
        let plain = draw();
        crate::utils::patch_environment([("RANK", "1"), ("WORLD_SIZE", "2")], || {
            set_seed(42, true).unwrap();
        });
        assert_eq!(draw(), plain);
        crate::utils::patch_environment([("RANK", "x"), ("WORLD_SIZE", "2")], || {
            assert!(set_seed(42, true).unwrap_err().to_string().contains("RANK"));
        });
    }
}
