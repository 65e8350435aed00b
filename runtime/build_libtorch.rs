// Shared by the build scripts of every package that links libtorch (included with `include!`).
//
// tch's binaries carry no RPATH, so without this they only start with LD_LIBRARY_PATH set. torch-sys
// (`links = "tch"`) exports the directory it linked against as DEP_TCH_LIBTORCH_LIB to packages that
// depend on it directly; we bake that directory into every binary, test and example of the package.
// A link argument from a library's build script does not reach its dependents, hence one call per package.

/// Emits the rpath for libtorch's directory and exposes it to the crate as `HASTEN_BUILD_LIBTORCH_LIB`.
fn emit_libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
            println!("cargo:rustc-env=HASTEN_BUILD_LIBTORCH_LIB={lib}");
        }
        Err(_) => {
            println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: binaries will need LD_LIBRARY_PATH");
            println!("cargo:rustc-env=HASTEN_BUILD_LIBTORCH_LIB=");
        }
    }
}
