//! Experiment trackers. For now the names Accelerate gives them; the trackers themselves follow with
//! the Accelerator.

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
