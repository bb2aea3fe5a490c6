//! The bpffs pin layout, in one place. Under the root (default
//! `/sys/fs/bpf/rootlet`):
//!
//! ```text
//! <netns-inode>_<ifindex>/          one rootlet
//!     link                          the XDP bpf_link (changed only by BPF_LINK_UPDATE)
//!     stats                         per-slot per-action counters, by generation parity
//!                                   (freplace: parity 0); they survive every change
//!     gen-<N>/rootlet               freplace: generation N's rootlet program
//!     gen-<N>/slot-<K>              freplace: the link of pinned stage K into it
//!     chain/rootlet                 tail-call: the rootlet program
//!     chain/rootlet_gen             tail-call: the generation word
//!     chain/rootlet_first           tail-call: hop array to the first stage, by parity
//!     chain/hop-<K>                 tail-call: hop array after slot K, by parity (slot K's rootlet_next)
//!     chain/slot-<K>                tail-call: owner array of pinned stage K: by parity the instance
//!                                   it runs, then by parity the one kept for the next rebuild
//!     chain/gate-<K>-<P>            tail-call: the parity-P gate that stands for unpinned stage K
//!                                   in hop arrays
//! loading/                          transient pins used while loading, and the pin-by-name
//!                                   maps of the object being loaded (bpffs forbids dots in names)
//! ```

use std::{
    io,
    path::{Path, PathBuf},
};

use super::spec::RootletKey;

#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn rootlet_dir(&self, key: RootletKey) -> PathBuf {
        self.root.join(format!("{}_{}", key.netns_ino, key.ifindex))
    }

    /// Parses a directory name back into a key.
    pub fn parse_dir(name: &str) -> Option<RootletKey> {
        let (ino, ifindex) = name.split_once('_')?;
        Some(RootletKey {
            netns_ino: ino.parse().ok()?,
            ifindex: ifindex.parse().ok()?,
        })
    }

    pub fn link(&self, key: RootletKey) -> PathBuf {
        self.rootlet_dir(key).join("link")
    }

    pub fn stats(&self, key: RootletKey) -> PathBuf {
        self.rootlet_dir(key).join("stats")
    }

    /// The count of packets handled with the final verdict, by parity.
    pub fn final_counts(&self, key: RootletKey) -> PathBuf {
        self.rootlet_dir(key).join("final")
    }

    pub fn gen_dir(&self, key: RootletKey, generation: u64) -> PathBuf {
        self.rootlet_dir(key).join(format!("gen-{generation}"))
    }

    /// Generation numbers that have a directory, ascending.
    pub fn generations(&self, key: RootletKey) -> io::Result<Vec<u64>> {
        let mut gens = vec![];
        for entry in std::fs::read_dir(self.rootlet_dir(key))? {
            let name = entry?.file_name();
            if let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("gen-"))
                .and_then(|n| n.parse().ok())
            {
                gens.push(n);
            }
        }
        gens.sort_unstable();
        Ok(gens)
    }

    pub fn gen_rootlet(&self, key: RootletKey, generation: u64) -> PathBuf {
        self.gen_dir(key, generation).join("rootlet")
    }

    pub fn gen_slot_link(&self, key: RootletKey, generation: u64, slot: u32) -> PathBuf {
        self.gen_dir(key, generation).join(format!("slot-{slot}"))
    }

    pub fn chain_dir(&self, key: RootletKey) -> PathBuf {
        self.rootlet_dir(key).join("chain")
    }

    pub fn chain_obj(&self, key: RootletKey, name: &str) -> PathBuf {
        self.chain_dir(key).join(name)
    }

    pub fn chain_slot(&self, key: RootletKey, slot: u32) -> PathBuf {
        self.chain_dir(key).join(format!("slot-{slot}"))
    }

    pub fn chain_hop(&self, key: RootletKey, slot: u32) -> PathBuf {
        self.chain_dir(key).join(format!("hop-{slot}"))
    }

    pub fn chain_gate(&self, key: RootletKey, slot: u32, parity: u32) -> PathBuf {
        self.chain_dir(key).join(format!("gate-{slot}-{parity}"))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("loading")
    }

    /// Every rootlet directory under the root.
    pub fn rootlets(&self) -> io::Result<Vec<RootletKey>> {
        let mut keys = vec![];
        match std::fs::read_dir(&self.root) {
            Ok(entries) => {
                for entry in entries {
                    if let Some(k) = entry?.file_name().to_str().and_then(Self::parse_dir) {
                        keys.push(k);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        keys.sort();
        Ok(keys)
    }
}

/// Removes a pin or a directory of pins; absent is fine. Unpinning drops the
/// pin's reference: the object goes when nothing else holds it.
pub fn remove(path: &Path) -> io::Result<()> {
    let result = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
