//! Errors of the loader, attacher and map readers. Every variant names what it was working on
//! (interface, program, pin path) and keeps the kernel's reason as its source.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{EbpfError, maps::MapError, pin::PinError, programs::ProgramError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object into the kernel")]
    LoadObject(#[source] Box<EbpfError>),

    #[error("program {0} is missing from the eBPF object or has the wrong type")]
    MissingProgram(&'static str),

    #[error("the kernel rejected program {program}")]
    LoadProgram {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("attaching {program} to {hook} on interface {iface}")]
    Attach {
        program: &'static str,
        hook: &'static str,
        iface: String,
        #[source]
        source: Box<ProgramError>,
    },

    #[error(
        "attaching {program} to tc ingress on interface {iface}: tcx failed ({tcx}), and so did \
         clsact/cls_bpf"
    )]
    AttachTc {
        program: &'static str,
        iface: String,
        tcx: String,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("pinning {what} at {path}")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<PinError>,
    },

    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{dir} already holds a loaded instance; run `unload --pin-dir {dir}` first",
        dir = .0.display()
    )]
    AlreadyLoaded(PathBuf),

    #[error(
        "the datapath pinned under {dir} was loaded by a build whose map {name} has another \
         layout; run `unload --pin-dir {dir}` (its connections are forgotten) and start again",
        dir = .dir.display()
    )]
    IncompatiblePins {
        dir: PathBuf,
        name: String,
        #[source]
        source: Box<MapError>,
    },

    #[error("reading map {name}")]
    Map {
        name: String,
        #[source]
        source: Box<MapError>,
    },

    #[error(
        "{} is not on bpffs; mount it with `mount -t bpf bpf /sys/fs/bpf` or choose a pin \
         directory under a bpffs mount",
        .0.display()
    )]
    NotBpffs(PathBuf),

    #[error("{what}")]
    Link {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("running {program} on a test packet")]
    TestRun {
        program: &'static str,
        #[source]
        source: Box<ProgramError>,
    },

    #[error("building the test packet: {0}")]
    BuildPacket(String),

    #[error("the Kubernetes source")]
    Source(#[source] Box<crate::kube_source::Error>),

    #[error("no interface to attach to: give at least one --xdp-iface or --tc-iface")]
    NoInterface,
}

impl Error {
    pub(crate) fn attach(
        program: &'static str,
        hook: &'static str,
        iface: &str,
    ) -> impl FnOnce(ProgramError) -> Self {
        let iface = iface.to_owned();
        move |source| Self::Attach { program, hook, iface, source: Box::new(source) }
    }

    pub(crate) fn pin(what: impl Into<String>, path: &Path) -> impl FnOnce(PinError) -> Self {
        let (what, path) = (what.into(), path.to_owned());
        move |source| Self::Pin { what, path, source: Box::new(source) }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// `error` and its sources, one after the other: what a log line needs to say why.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
