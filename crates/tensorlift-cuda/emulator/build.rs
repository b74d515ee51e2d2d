//! Gives the library the SONAME `libcuda.so`: cudarc loads the driver by that name, and the
//! dynamic loader then returns this library if the process already loaded it by its path.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so");
}
