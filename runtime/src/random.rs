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
    fn device_specific_adds_the_rank() {
        set_seed(43, false).unwrap();
        let plain = draw();
        crate::patch_environment([("RANK", "1"), ("WORLD_SIZE", "2")], || {
            set_seed(42, true).unwrap();
        });
        assert_eq!(draw(), plain);
        crate::patch_environment([("RANK", "x"), ("WORLD_SIZE", "2")], || {
            assert!(set_seed(42, true).unwrap_err().to_string().contains("RANK"));
        });
    }
}
