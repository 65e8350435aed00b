include!("../runtime/build_libtorch.rs");

fn main() {
    emit_libtorch_rpath();
}
