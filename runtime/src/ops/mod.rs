//! Accelerate's operations on nested data: one recursion mechanism ([`Nested`]), local operations
//! (concatenate, slice_tensors, send_to_device, convert_to_fp32, listify) and collective ones (methods
//! of [`ProcessGroup`](crate::ProcessGroup): gather, reduce, broadcast_data, pad_across_processes, …).

mod collective;
mod local;
mod nested;

pub use collective::Reduction;
pub(crate) use collective::is_float;
pub use local::{
    concatenate, convert_to_fp32, listify, listify_tensor, send_to_device, slice_tensors,
};
pub use nested::{Layout, Nested, map_tensors, tensors_of};
