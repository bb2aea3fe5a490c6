//! rootlet.v1 requests the API tests build again and again: the fixture's
//! interface and rootlet ref, a generic-mode load, a stage of an embedded
//! object, a link request, a bundle of embedded objects, and the
//! google.rpc details of an error status.

use std::path::Path;

use rootlet_proto::v1::{self as pb, rootlet_client::RootletClient};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::fixture::Fixture;

/// The fixture's host interface, in its namespace.
pub fn interface(f: &Fixture) -> pb::Interface {
    pb::Interface {
        netns: f.netns_path().display().to_string(),
        ifname: f.pair.host_if().into(),
    }
}

/// The fixture's rootlet, by interface.
pub fn rootlet_ref(f: &Fixture) -> Option<pb::RootletRef> {
    Some(pb::RootletRef {
        r#ref: Some(pb::rootlet_ref::Ref::Interface(interface(f))),
    })
}

/// Loads a rootlet on the fixture's interface in generic mode, final
/// verdict PASS.
pub async fn load(c: &mut RootletClient<Channel>, f: &Fixture) -> pb::RootletState {
    c.load_rootlet(pb::LoadRootletRequest {
        interface: Some(interface(f)),
        mode: pb::XdpMode::Generic as i32,
        final_verdict: pb::XdpAction::Pass as i32,
        idempotency_key: String::new(),
    })
    .await
    .expect("load rootlet")
    .into_inner()
}

/// A pinned stage `name` of the embedded object `object`.
pub fn stage(name: &str, object: &str, priority: i32) -> pb::Stage {
    let e = rootlet_ebpf::stage(object).expect("object");
    pb::Stage {
        name: name.into(),
        object: e.object.to_vec(),
        program: e.program.into(),
        priority,
        pin: true,
        ..Default::default()
    }
}

pub fn link(r: Option<pb::RootletRef>, s: pb::Stage) -> pb::LinkStageRequest {
    pb::LinkStageRequest {
        rootlet: r,
        stage: Some(s),
        ..Default::default()
    }
}

/// The manifest's `[[rootlets]]` table for the fixture's interface.
pub fn targets(f: &Fixture) -> String {
    format!(
        "[[rootlets]]\ninterface = \"{}\"\nnetns = \"{}\"\nmode = \"generic\"\n",
        f.pair.host_if(),
        f.netns_path().display()
    )
}

/// An unsigned bundle `name` `version`, built in a new directory under
/// `dir`, of embedded objects: (stage, object, priority, owner).
pub fn bundle(
    dir: &Path,
    name: &str,
    version: &str,
    targets: &str,
    stages: &[(&str, &str, i32, &str)],
) -> rootlet_bundle::SignedBundle {
    let dir = dir.join(format!("bundle-{name}-{version}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut manifest = format!("name = \"{name}\"\nversion = \"{version}\"\n{targets}");
    for (stage, object, prio, owner) in stages {
        let e = rootlet_ebpf::stage(object).expect("object");
        std::fs::write(dir.join(format!("{object}.o")), e.object).expect("object file");
        manifest.push_str(&format!(
            "[[stages]]\nname = \"{stage}\"\nobject = \"{object}.o\"\nprogram = \"{}\"\npriority = {prio}\nowner = \"{owner}\"\n",
            e.program
        ));
    }
    std::fs::write(dir.join("manifest.toml"), manifest).expect("manifest");
    let bundle = rootlet_bundle::Bundle::build(dir.join("manifest.toml")).expect("build bundle");
    rootlet_bundle::SignedBundle::new(bundle)
}

/// The status's ErrorInfo reason ("" if it has none).
pub fn reason(s: &tonic::Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// The fields its BadRequest names.
pub fn bad_fields(s: &tonic::Status) -> Vec<String> {
    s.get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
