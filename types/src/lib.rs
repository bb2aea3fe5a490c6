//! The vocabulary every layer of Rootlet shares: XDP verdicts and modes, map
//! policies, and the kinds of backend. The data plane, the bundle format
//! and the API's conversions all speak these types, and none of them owns
//! them: this crate depends on nothing but serde.
//!
//! Each type's `name()` is its spelling in manifests and configuration
//! (lowercase), and its serde form.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An XDP verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAction {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl XdpAction {
    /// Every action, in the kernel's order.
    pub const ALL: [XdpAction; 5] = [
        Self::Aborted,
        Self::Drop,
        Self::Pass,
        Self::Tx,
        Self::Redirect,
    ];

    /// The manifest's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Aborted => "aborted",
            Self::Drop => "drop",
            Self::Pass => "pass",
            Self::Tx => "tx",
            Self::Redirect => "redirect",
        }
    }

    /// The action a manifest spells `s` (lowercase only).
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == s)
    }
}

impl fmt::Display for XdpAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a rootlet attaches to its interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Driver mode where the driver supports it, else generic.
    #[default]
    Auto,
    Driver,
    Generic,
}

impl XdpMode {
    /// Every mode.
    pub const ALL: [XdpMode; 3] = [Self::Auto, Self::Driver, Self::Generic];

    /// The manifest's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Driver => "driver",
            Self::Generic => "generic",
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a stage's maps carry over from the stage it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapPolicy {
    /// Every map starts empty.
    #[default]
    Fresh,
    /// Maps whose names match the replaced stage's are reused.
    Keep,
}

impl MapPolicy {
    /// Every policy.
    pub const ALL: [MapPolicy; 2] = [Self::Fresh, Self::Keep];

    /// The manifest's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Keep => "keep",
        }
    }
}

impl fmt::Display for MapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a rootlet's program runs on its interface: the attach point, an
/// axis apart from the [`Backend`] that links stages into it. XDP only for
/// now; tcx (ingress, egress) is the next kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookKind {
    /// An XDP link on the interface (driver or generic mode).
    #[default]
    Xdp,
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookKind::Xdp => "xdp",
        })
    }
}

/// How stages are linked into a rootlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// BPF_PROG_TYPE_EXT programs replacing the rootlet's placeholders.
    Freplace,
    /// Per-slot program arrays and a chain flipped by generation.
    TailCall,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Freplace => "freplace",
            Backend::TailCall => "tailcall",
        })
    }
}

/// What the configuration asks for; `Auto` takes freplace where the kernel
/// permits it (see the data plane's probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Freplace,
    TailCall,
}
