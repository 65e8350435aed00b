//! Accelerate's string enums whose features live in the runtime: how a job is distributed, which random
//! generators are synchronised, which experiment trackers log.

use crate::string_enum::string_enum;

string_enum! {
    /// Experiment trackers by name (`log_with`).
    pub enum LoggerType {
        /// Every tracker available.
        All = "all",
        /// Aim.
        Aim = "aim",
        /// TensorBoard.
        Tensorboard = "tensorboard",
        /// Weights & Biases.
        Wandb = "wandb",
        /// Trackio.
        Trackio = "trackio",
        /// Comet ML.
        Cometml = "comet_ml",
        /// MLflow.
        Mlflow = "mlflow",
        /// ClearML.
        Clearml = "clearml",
        /// DVCLive.
        Dvclive = "dvclive",
        /// SwanLab.
        Swanlab = "swanlab",
    }
}

string_enum! {
    /// How the job is distributed (`distributed_type`).
    pub enum DistributedType {
        /// One process.
        No = "NO",
        /// Several CPU processes.
        MultiCpu = "MULTI_CPU",
        /// Several CUDA GPUs.
        MultiGpu = "MULTI_GPU",
        /// Several Ascend NPUs.
        MultiNpu = "MULTI_NPU",
        /// Several Cambricon MLUs.
        MultiMlu = "MULTI_MLU",
        /// Several SDAA devices.
        MultiSdaa = "MULTI_SDAA",
        /// Several Moore Threads GPUs.
        MultiMusa = "MULTI_MUSA",
        /// Several Intel XPUs.
        MultiXpu = "MULTI_XPU",
        /// DeepSpeed.
        Deepspeed = "DEEPSPEED",
        /// Fully sharded data parallel.
        Fsdp = "FSDP",
        /// TPUs through torch_xla.
        Xla = "XLA",
        /// Megatron-LM.
        MegatronLm = "MEGATRON_LM",
        /// Several Gaudi HPUs.
        MultiHpu = "MULTI_HPU",
        /// Several AWS Neuron cores.
        MultiNeuron = "MULTI_NEURON",
    }
}

string_enum! {
    /// Which random generators to synchronise across processes (`rng_types`).
    pub enum RNGType {
        /// libtorch's CPU generator.
        Torch = "torch",
        /// libtorch's CUDA generators.
        Cuda = "cuda",
        /// Cambricon MLU.
        Mlu = "mlu",
        /// SDAA.
        Sdaa = "sdaa",
        /// Moore Threads.
        Musa = "musa",
        /// Ascend NPU.
        Npu = "npu",
        /// torch_xla.
        Xla = "xla",
        /// Intel XPU.
        Xpu = "xpu",
        /// Gaudi HPU.
        Hpu = "hpu",
        /// AWS Neuron.
        Neuron = "neuron",
        /// The data loader's own generator.
        Generator = "generator",
    }
}
