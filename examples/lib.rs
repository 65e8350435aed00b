//! hasten's runnable examples, as `[[example]]` targets of this package:
//!
//! - `train_demo`: README's training loop, run by `make demo` through `hasten launch` (or, with
//!   `--notebook N`, through `notebook_launcher`).
//! - `big_model`: README's big-model inference: an empty-weights model, an automatic device map over
//!   GPUs, CPU and disk, and a dispatched forward.
//!
//! Build them with `cargo build -p hasten-examples --examples`.
#![deny(missing_docs)]
