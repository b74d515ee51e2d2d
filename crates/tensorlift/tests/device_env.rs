//! `TENSORLIFT_DEVICE` names the device of loaders that name none; a loader that asks for
//! mapped views, which are host memory, goes to the host instead, and says why (a binary of
//! its own: the variable is the process's).

use tensorlift::{Device, Loader, DEVICE_ENV};

#[test]
fn mapped_views_take_the_host_over_the_environments_device() {
    // SAFETY of the process: this binary's only test, so no other thread reads the variable.
    std::env::set_var(DEVICE_ENV, "cuda:0");
    // A device there is: the emulated driver's, unless a GPU host's real one is asked for.
    if !tensorlift_testkit::real_driver() {
        std::env::set_var("TENSORLIFT_LIBCUDA", tensorlift_testkit::emulated_driver());
    }
    // SAFETY: every file this test maps is its own, and none is changed while mapped.
    let contract = unsafe { tensorlift::MapContract::new() };
    let loader = Loader::builder().map_views(contract).build().unwrap();
    assert_eq!(loader.device(), Device::Cpu);
    assert_eq!(loader.device_reason(), "TENSORLIFT_DEVICE=cuda:0, but mapped views are host memory");
    // A loader that names CUDA itself is refused (tests/engine/api.rs), and one without
    // mapped views takes the variable's device.
    let plain = Loader::builder().build().unwrap();
    assert_eq!((plain.device(), plain.device_reason()), (Device::Cuda(0), "TENSORLIFT_DEVICE=cuda:0"));
}
