// The kernel compiles notebooks against the libtorch hasten was built with: remember where it was.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var("LIBTORCH").unwrap_or_default();
    println!("cargo:rustc-env=HASTEN_KERNEL_BUILD_LIBTORCH={libtorch}");
}
