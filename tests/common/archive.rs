//! Image archives in the format `docker save` writes, built in the test: a busybox image (the
//! static busybox of Debian's busybox-static package, with a few applets as links) and images
//! of a chosen size. Included with `#[path = "common/archive.rs"] mod archive;`.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use serde_json::{json, Value};

fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

/// A tar of `(kind, path, mode, data or link target)`.
pub fn tar_of(entries: &[(tar::EntryType, &str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, path, mode, data) in entries {
        if *kind == tar::EntryType::Symlink {
            let mut h = header(*kind, path, *mode, 0);
            h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        } else {
            let h = header(*kind, path, *mode, data.len() as u64);
            b.append(&h, *data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// `manifest.json`, the config, one `layer.tar` per layer.
pub fn docker_save(layers: &[Vec<u8>], config: Value) -> Vec<u8> {
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("layer{i}/layer.tar"))
        .collect();
    let manifest = json!([{"Config": "config.json", "RepoTags": ["test:latest"], "Layers": names}])
        .to_string();
    let config = config.to_string();
    let mut entries: Vec<(tar::EntryType, &str, u32, &[u8])> = vec![
        (
            tar::EntryType::Regular,
            "config.json",
            0o644,
            config.as_bytes(),
        ),
        (
            tar::EntryType::Regular,
            "manifest.json",
            0o644,
            manifest.as_bytes(),
        ),
    ];
    for (name, layer) in names.iter().zip(layers) {
        entries.push((tar::EntryType::Regular, name, 0o644, layer));
    }
    tar_of(&entries)
}

/// Busybox with `sh`, `cat`, `ls`, `echo` as links, `/marker.txt` saying `marker`, and a
/// `Cmd` that serves port 8000 (so a sandbox of it is `running`).
pub fn busybox_image(marker: &str) -> Vec<u8> {
    use tar::EntryType::{Directory, Regular, Symlink};
    let busybox =
        std::fs::read("/bin/busybox").expect("/bin/busybox: apt-get install busybox-static");
    let mut layer: Vec<(tar::EntryType, &str, u32, &[u8])> = vec![
        (Directory, "bin/", 0o755, b""),
        (Directory, "etc/", 0o755, b""),
        (Regular, "bin/busybox", 0o755, &busybox),
        (Regular, "marker.txt", 0o644, marker.as_bytes()),
    ];
    for applet in ["bin/sh", "bin/cat", "bin/ls", "bin/echo"] {
        layer.push((Symlink, applet, 0o777, b"busybox"));
    }
    docker_save(
        &[tar_of(&layer)],
        json!({"architecture": "amd64", "os": "linux", "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8000"],
        }}),
    )
}

/// An image of one layer holding `/blob`, `size` bytes (an archive a little larger).
pub fn sized_image(size: usize) -> Vec<u8> {
    let blob: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let layer = tar_of(&[(tar::EntryType::Regular, "blob", 0o644, &blob)]);
    docker_save(
        &[layer],
        json!({"architecture": "amd64", "os": "linux", "config": {}}),
    )
}
