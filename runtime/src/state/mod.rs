//! Process state as an explicit value: built once from the environment contract and passed around,
//! instead of Accelerate's shared-dict singletons.

mod gradient;

pub use gradient::{GradientState, GradientStateHandle};

use crate::{DistributedType, EnvContract, Result, select_device};
use hasten_core::{USE_CPU_VAR, debug_mode_from_env, parse_flag_from_env};
use tch::Device;

/// Everything a worker knows about its place in the job: Accelerate's `PartialState`, as a value.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessState {
    /// The environment contract this state was built from.
    pub contract: EnvContract,
    /// The device this process computes on.
    pub device: Device,
    /// NO, MULTI_CPU or MULTI_GPU.
    pub distributed_type: DistributedType,
    /// Debug mode: verify shapes across ranks before collectives.
    pub debug: bool,
    /// True when the CPU was forced (`ACCELERATE_USE_CPU`).
    pub use_cpu: bool,
}

impl ProcessState {
    /// Builds the state from the environment: the contract, `ACCELERATE_USE_CPU`,
    /// `ACCELERATE_DEBUG_MODE`, and the GPUs this process sees.
    pub fn from_env() -> Result<Self> {
        let contract = EnvContract::from_env()?;
        let use_cpu = parse_flag_from_env(USE_CPU_VAR, false)?;
        let debug = debug_mode_from_env()?;
        // Only look for GPUs when they may be used: asking initialises CUDA.
        let gpus = if use_cpu {
            0
        } else {
            crate::cuda_device_count()
        };
        Self::new(contract, use_cpu, debug, gpus)
    }

    /// Builds the state from explicit parts; `cuda_devices` is the number of GPUs visible.
    pub fn new(
        contract: EnvContract,
        use_cpu: bool,
        debug: bool,
        cuda_devices: usize,
    ) -> Result<Self> {
        let device = select_device(contract.local_rank, use_cpu, cuda_devices);
        let distributed_type = match (contract.world_size, device) {
            (1, _) => DistributedType::No,
            (_, Device::Cuda(_)) => DistributedType::MultiGpu,
            _ => DistributedType::MultiCpu,
        };
        Ok(ProcessState {
            contract,
            device,
            distributed_type,
            debug,
            use_cpu,
        })
    }

    /// Global rank (Accelerate's `process_index`).
    pub fn process_index(&self) -> usize {
        self.contract.rank
    }

    /// Rank on this node (Accelerate's `local_process_index`).
    pub fn local_process_index(&self) -> usize {
        self.contract.local_rank
    }

    /// Number of processes in the job.
    pub fn num_processes(&self) -> usize {
        self.contract.world_size
    }

    /// True on global rank 0.
    pub fn is_main_process(&self) -> bool {
        self.contract.rank == 0
    }

    /// True on rank 0 of this node.
    pub fn is_local_main_process(&self) -> bool {
        self.contract.local_rank == 0
    }

    /// True on the last global rank.
    pub fn is_last_process(&self) -> bool {
        self.contract.rank + 1 == self.contract.world_size
    }

    /// True when more than one process takes part.
    pub fn use_distributed(&self) -> bool {
        self.contract.world_size > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::utils::ContractSource;

    fn contract(rank: usize, world: usize, local_rank: usize, local_world: usize) -> EnvContract {
        EnvContract {
            rank,
            local_rank,
            world_size: world,
            local_world_size: local_world,
            source: ContractSource::Torchrun,
            ..EnvContract::default()
        }
    }

    #[test]
    fn distributed_type_follows_world_size_and_device() {
        let single = ProcessState::new(EnvContract::default(), false, false, 0).unwrap();
        assert_eq!(single.distributed_type, DistributedType::No);
        assert_eq!(single.device, Device::Cpu);
        assert!(single.is_main_process() && single.is_last_process() && !single.use_distributed());

        let cpu = ProcessState::new(contract(1, 2, 1, 2), false, true, 0).unwrap();
        assert_eq!(cpu.distributed_type, DistributedType::MultiCpu);
        assert!(cpu.debug && cpu.is_last_process() && !cpu.is_main_process());

        let gpu = ProcessState::new(contract(3, 4, 1, 2), false, false, 2).unwrap();
        assert_eq!(gpu.distributed_type, DistributedType::MultiGpu);
        assert_eq!(gpu.device, Device::Cuda(1));
        assert!(!gpu.is_local_main_process());
        assert_eq!(
            (
                gpu.process_index(),
                gpu.local_process_index(),
                gpu.num_processes()
            ),
            (3, 1, 4)
        );

        let forced = ProcessState::new(contract(0, 2, 0, 2), true, false, 2).unwrap();
        assert_eq!(forced.device, Device::Cpu);
        assert_eq!(forced.distributed_type, DistributedType::MultiCpu);
    }

    #[test]
    fn from_env_reads_the_flags() {
        crate::utils::patch_environment(
            [
                ("RANK", "1"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "1"),
                ("ACCELERATE_USE_CPU", "yes"),
                ("ACCELERATE_DEBUG_MODE", "TRUE"),
            ],
            || {
                let s = ProcessState::from_env().unwrap();
                assert_eq!(s.device, Device::Cpu);
                assert!(s.debug && s.use_cpu);
                assert_eq!(s.distributed_type, DistributedType::MultiCpu);
            },
        );
        crate::utils::patch_environment([("ACCELERATE_USE_CPU", "sometimes")], || {
            let err = ProcessState::from_env().unwrap_err().to_string();
            assert!(err.contains("ACCELERATE_USE_CPU"), "{err}");
        });
    }
}
