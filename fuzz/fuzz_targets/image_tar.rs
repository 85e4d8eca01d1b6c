//! The image archive reader on arbitrary input: an outer archive (OCI layout or `docker save`),
//! or (input starting with `L`) one layer of entries. It may refuse; it must not panic, hang,
//! or write beside the root it unpacks into.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stray = sandgate::sandbox::image::fuzz_unpack(data).expect("the temp dir is writable");
    assert!(stray.is_empty(), "written outside the image root: {stray:?}");
});
