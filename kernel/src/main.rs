//! `hasten-kernel`: the Jupyter kernel (evcxr with hasten in scope). Not built yet: this binary only
//! says so, so that nothing mistakes it for a working kernel.

fn main() {
    eprintln!(
        "hasten-kernel {}: the Jupyter kernel is not part of this build yet; \
         use `hasten launch` or notebook_launcher from a Rust program meanwhile",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
