//! Network namespaces: identify one by inode, and run code inside one on a
//! dedicated thread (setns(2) affects only the calling thread, and an XDP
//! link resolves its ifindex in the caller's namespace).

use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

use super::error::{Error, Result};

const SELF_NETNS: &str = "/proc/self/ns/net";

fn netns_path(netns: Option<&Path>) -> PathBuf {
    netns.map_or_else(|| PathBuf::from(SELF_NETNS), Path::to_path_buf)
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Netns {
        path: path.to_owned(),
        source,
    })
}

/// The inode identifying a network namespace (None: the caller's own).
pub fn inode(netns: Option<&Path>) -> Result<u64> {
    let path = netns_path(netns);
    let meta = open(&path)?.metadata().map_err(|source| Error::Netns {
        path: path.clone(),
        source,
    })?;
    Ok(meta.ino())
}

/// Runs `f` on a new thread that has entered `netns` (None: runs it on a
/// new thread in the caller's namespace, for uniformity).
pub fn run_in<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = netns_path(netns);
    let file = open(&path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if netns.is_some() {
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns {
                        path: path.clone(),
                        source: e.into(),
                    })?;
                }
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The ifindex of `ifname` inside `netns`.
pub fn ifindex(netns: Option<&Path>, ifname: &str) -> Result<u32> {
    let name = ifname.to_owned();
    run_in(netns, move || {
        nix::net::if_::if_nametoindex(name.as_str()).map_err(|_| Error::InterfaceNotFound {
            ifname: name.clone(),
            netns: netns_path(netns).display().to_string(),
        })
    })
}
