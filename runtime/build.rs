include!("build_libtorch.rs");

fn main() {
    emit_libtorch_rpath();
    build_shim();
}

/// Compiles csrc/shim.cpp against the libtorch headers tch compiled against.
fn build_shim() {
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not find libtorch (set LIBTORCH)");
    };
    let root = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch's lib folder has a parent");
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("hasten_shim");
}
