//! Experiment trackers (Accelerate's `tracking.py`): the [`GeneralTracker`] trait every tracker implements,
//! the values they log, and TensorBoard, written natively (event files any TensorBoard reads).
//!
//! Accelerate's other trackers (wandb, MLflow, Comet…) are clients of Python services; hasten skips them with
//! a warning, and a [`GeneralTracker`] of your own passed to `AcceleratorBuilder::tracker` covers any other
//! destination, as Accelerate's custom trackers do.

mod event;
mod tensorboard;

pub use tensorboard::{SummaryWriter, TensorBoardTracker};

use crate::Result;
use std::any::Any;

/// A value for `log` or `init_trackers`' configuration: Accelerate accepts int, float, str, bool and None,
/// and a dict of floats (TensorBoard's `add_scalars`).
#[derive(Debug, Clone, PartialEq)]
pub enum LogValue {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A flag (a hyperparameter; logged as 0/1 where a number is needed, as Python's `bool` is an `int`).
    Bool(bool),
    /// Text.
    Str(String),
    /// Several curves under one name (`{"train": 0.5, "eval": 0.6}`).
    Scalars(Vec<(String, f64)>),
    /// No value (a configuration entry left unset).
    None,
}

impl LogValue {
    /// The value as a number, where it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            LogValue::Int(i) => Some(*i as f64),
            LogValue::Float(x) => Some(*x),
            LogValue::Bool(b) => Some(f64::from(u8::from(*b))),
            _ => None,
        }
    }
}

macro_rules! from_number {
    ($variant:ident, $as:ty: $($t:ty),*) => {$(
        impl From<$t> for LogValue {
            fn from(v: $t) -> Self {
                LogValue::$variant(v as $as)
            }
        }
    )*};
}
from_number!(Int, i64: i8, i16, i32, i64, u8, u16, u32, u64, usize);
from_number!(Float, f64: f32, f64);

impl From<bool> for LogValue {
    fn from(v: bool) -> Self {
        LogValue::Bool(v)
    }
}

impl From<&str> for LogValue {
    fn from(v: &str) -> Self {
        LogValue::Str(v.to_owned())
    }
}

impl From<String> for LogValue {
    fn from(v: String) -> Self {
        LogValue::Str(v)
    }
}

impl<K: Into<String>> From<Vec<(K, f64)>> for LogValue {
    fn from(v: Vec<(K, f64)>) -> Self {
        LogValue::Scalars(v.into_iter().map(|(k, x)| (k.into(), x)).collect())
    }
}

impl<T: Into<LogValue>> From<Option<T>> for LogValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(LogValue::None, Into::into)
    }
}

/// Named values, in the order given (Accelerate's `dict`).
pub type LogValues = Vec<(String, LogValue)>;

/// Collects `(name, value)` pairs of any convertible types into [`LogValues`].
pub fn log_values<K: Into<String>, V: Into<LogValue>>(
    values: impl IntoIterator<Item = (K, V)>,
) -> LogValues {
    values
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

/// Accelerate's `GeneralTracker`: what the Accelerator calls on every tracker. Only `name` and `log` are
/// required; the rest default to doing nothing, as in Accelerate.
pub trait GeneralTracker: Send {
    /// The tracker's name, used by `get_tracker` and `log_kwargs` (e.g. `"tensorboard"`).
    fn name(&self) -> &str;

    /// Whether the tracker writes under the project's logging folder.
    fn requires_logging_directory(&self) -> bool {
        false
    }

    /// Whether only the main process calls it (default true, as Accelerate).
    fn main_process_only(&self) -> bool {
        true
    }

    /// Deferred set-up, called by `init_trackers` (files, connections).
    fn start(&mut self) -> Result<()> {
        Ok(())
    }

    /// Records the run's hyperparameters.
    fn store_init_configuration(&mut self, _values: &[(String, LogValue)]) -> Result<()> {
        Ok(())
    }

    /// Records `values` at `step`.
    fn log(&mut self, values: &[(String, LogValue)], step: Option<u64>) -> Result<()>;

    /// Flushes and closes; called by `end_training`.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }

    /// The tracker itself, for `downcast_mut` to its concrete type (Accelerate's `unwrap=True`).
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A custom tracker handed to the builder (boxed so the builder stays one type).
pub(crate) struct CustomTracker(pub(crate) Box<dyn GeneralTracker>);

impl std::fmt::Debug for CustomTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CustomTracker({:?})", self.0.name())
    }
}
