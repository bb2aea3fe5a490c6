//! Manifest parsing: the happy path, defaults, and each error with the
//! exact field, line and column it reports.

use rootlet_bundle::{
    BundleError, Lifetime, Manifest, MapPolicy, RootletTarget, XdpAction, XdpMode,
};

const FULL: &str = r#"# An edge pipeline.
name = "edge-pipeline"
version = "1.4.0"

[[rootlets]]
interface = "eth0"
netns = "/run/netns/edge"
mode = "driver"
final_verdict = "drop"

[[rootlets]]
interface = "eth1"

[[stages]]
name = "ddos"
object = "objs/ddos.o"
program = "ddos"
priority = 20
proceed_on = ["pass", "tx"]
maps = "keep"
lifetime = "lease"
lease_seconds = 30
owner = "team-ddos"
rootlets = ["eth0"]

[[stages]]
name = "l4lb"
object = "l4lb.o"
program = "l4lb"
priority = -5
owner = "team-lb"
"#;

/// The (line, col, field, msg) of a manifest field error.
fn field_error(text: &str) -> (usize, usize, String, String) {
    match Manifest::parse(text, "manifest.toml") {
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field {
            line,
            col,
            field,
            msg,
            file,
        })) => {
            assert_eq!(file, "manifest.toml");
            (line, col, field, msg)
        }
        other => panic!("expected a field error, got {other:?}"),
    }
}

/// The manifest with `stage` as its one stage.
fn with_stage(stage: &str) -> String {
    format!(
        "name = \"x\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\n[[stages]]\n{stage}"
    )
}

const STAGE: &str =
    "name = \"a\"\nobject = \"a.o\"\nprogram = \"p\"\npriority = 1\nowner = \"me\"\n";

#[test]
fn parses_every_field() -> Result<(), BundleError> {
    let m = Manifest::parse(FULL, "manifest.toml")?;
    assert_eq!(m.name, "edge-pipeline");
    assert_eq!(m.version, "1.4.0");
    assert_eq!(
        m.rootlets,
        vec![
            RootletTarget {
                interface: "eth0".into(),
                netns: Some("/run/netns/edge".into()),
                mode: XdpMode::Driver,
                final_verdict: XdpAction::Drop,
            },
            RootletTarget {
                interface: "eth1".into(),
                netns: None,
                mode: XdpMode::Auto,
                final_verdict: XdpAction::Pass,
            },
        ]
    );
    let ddos = &m.stages[0];
    assert_eq!(ddos.name, "ddos");
    assert_eq!(ddos.object, "objs/ddos.o");
    assert_eq!(ddos.sha256, None);
    assert_eq!(ddos.program, "ddos");
    assert_eq!(ddos.priority, 20);
    assert_eq!(ddos.proceed_on, vec![XdpAction::Pass, XdpAction::Tx]);
    assert_eq!(ddos.maps, MapPolicy::Keep);
    assert_eq!(ddos.lifetime, Lifetime::Lease { seconds: 30 });
    assert_eq!(ddos.owner, "team-ddos");
    assert_eq!(ddos.rootlets, Some(vec!["eth0".to_string()]));
    assert!(ddos.targets(&m.rootlets[0]));
    assert!(!ddos.targets(&m.rootlets[1]));

    // Defaults.
    let lb = &m.stages[1];
    assert_eq!(lb.priority, -5);
    assert_eq!(lb.proceed_on, vec![XdpAction::Pass]);
    assert_eq!(lb.maps, MapPolicy::Fresh);
    assert_eq!(lb.lifetime, Lifetime::Pin);
    assert_eq!(lb.rootlets, None);
    assert_eq!(m.stages_for(&m.rootlets[1]).count(), 1);
    let order: Vec<&str> = m
        .stages_in_order()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(order, ["l4lb", "ddos"]);
    Ok(())
}

#[test]
fn inline_tables_and_hex_integers_are_accepted() -> Result<(), BundleError> {
    let text = "name = \"x\"\nversion = \"v\"\nrootlets = [{ interface = \"lo\" }]\n\
                stages = [{ name = \"a\", object = \"a.o\", program = \"p\", priority = 0x10, owner = \"o\", proceed_on = [] }]\n";
    let m = Manifest::parse(text, "m.toml")?;
    assert_eq!(m.stages[0].priority, 16);
    assert!(m.stages[0].proceed_on.is_empty());
    Ok(())
}

#[test]
fn no_stages_is_an_empty_pipeline() -> Result<(), BundleError> {
    let m = Manifest::parse(
        "name = \"x\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\n",
        "m.toml",
    )?;
    assert!(m.stages.is_empty());
    Ok(())
}

#[test]
fn canonical_text_parses_back_to_the_same_manifest() -> Result<(), BundleError> {
    let m = Manifest::parse(FULL, "manifest.toml")?;
    let text = m.to_canonical_toml();
    let back = Manifest::parse(&text, "canonical.toml")?;
    // Canonical order: rootlets by interface (already), stages by priority.
    assert_eq!(back.rootlets, m.rootlets);
    assert_eq!(back.stages[0], m.stages[1]);
    assert_eq!(back.stages[1], m.stages[0]);
    assert_eq!(back.to_canonical_toml(), text);
    Ok(())
}

#[test]
fn syntax_error_has_line_and_column() {
    let text = "name = \"x\"\nversion = \n";
    match Manifest::parse(text, "manifest.toml") {
        Err(e @ BundleError::Manifest(rootlet_bundle::located::LocatedError::Syntax { .. })) => {
            let BundleError::Manifest(rootlet_bundle::located::LocatedError::Syntax {
                line,
                col,
                ..
            }) = &e
            else {
                unreachable!()
            };
            assert_eq!((*line, *col), (2, 11), "{e}");
            assert!(e.to_string().starts_with("manifest.toml:2:11: "), "{e}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn duplicate_key_is_a_syntax_error() {
    let text = "name = \"x\"\nname = \"y\"\n";
    assert!(matches!(
        Manifest::parse(text, "m.toml"),
        Err(BundleError::Manifest(
            rootlet_bundle::located::LocatedError::Syntax {
                line: 2,
                col: 1,
                ..
            }
        ))
    ));
}

#[test]
fn wrong_type_names_the_field_line_and_column() {
    let mut text = String::from(FULL);
    text = text.replace("priority = -5", "priority = \"high\"");
    let (line, col, field, msg) = field_error(&text);
    assert_eq!((line, col), (30, 12));
    assert_eq!(field, "stages[1].priority");
    assert_eq!(msg, "expected an integer, found a string");
    let e = Manifest::parse(&text, "manifest.toml")
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("manifest.toml:30:12: stages[1].priority: expected an integer, found a string")
    );
}

#[test]
fn unknown_keys_are_errors_at_the_key() {
    // At the top level.
    let (line, col, field, msg) = field_error(&format!("{FULL}\nextra = 1\n"));
    // FULL ends inside the last [[stages]] table, so the key lands there.
    assert_eq!((line, col, field.as_str()), (33, 1, "stages[1].extra"));
    assert!(msg.starts_with("unknown key"), "{msg}");

    let (line, col, field, _) = field_error(&format!("colour = \"red\"\n{FULL}"));
    assert_eq!((line, col, field.as_str()), (1, 1, "colour"));

    // In a rootlet.
    let text = FULL.replace(
        "interface = \"eth1\"",
        "interface = \"eth1\"\n  ifindex = 3",
    );
    let (line, col, field, _) = field_error(&text);
    assert_eq!((line, col, field.as_str()), (13, 3, "rootlets[1].ifindex"));

    // In a stage.
    let (line, col, field, _) = field_error(&with_stage(&format!("{STAGE}pin = true\n")));
    assert_eq!((line, col, field.as_str()), (11, 1, "stages[0].pin"));
}

#[test]
fn missing_required_keys_point_at_their_table() {
    let (line, col, field, msg) = field_error(&with_stage(&STAGE.replace("owner = \"me\"\n", "")));
    assert_eq!((line, col, field.as_str()), (5, 1, "stages[0].owner"));
    assert_eq!(msg, "missing required key");

    let (line, col, field, _) =
        field_error("version = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\n");
    assert_eq!((line, col, field.as_str()), (1, 1, "name"));

    let (line, col, field, _) = field_error("name = \"x\"\nversion = \"1\"\n");
    assert_eq!((line, col, field.as_str()), (1, 1, "rootlets"));

    let (line, col, field, _) =
        field_error("name = \"x\"\nversion = \"1\"\n[[rootlets]]\nmode = \"auto\"\n");
    assert_eq!((line, col, field.as_str()), (3, 1, "rootlets[0].interface"));
}

#[test]
fn at_least_one_rootlet() {
    let (line, col, field, msg) = field_error("name = \"x\"\nversion = \"1\"\nrootlets = []\n");
    assert_eq!((line, col, field.as_str()), (3, 12, "rootlets"));
    assert!(msg.contains("at least one rootlet"), "{msg}");

    let (line, col, field, _) = field_error("name = \"x\"\nversion = \"1\"\nrootlets = \"eth0\"\n");
    assert_eq!((line, col, field.as_str()), (3, 12, "rootlets"));
}

#[test]
fn duplicate_stage_names() {
    let text = with_stage(&format!("{STAGE}[[stages]]\n{STAGE}"));
    let (line, col, field, msg) = field_error(&text);
    assert_eq!((line, col, field.as_str()), (12, 8, "stages[1].name"));
    assert_eq!(msg, "stage \"a\" is already defined on line 6");
}

#[test]
fn duplicate_rootlets() {
    let text = "name = \"x\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\n[[rootlets]]\ninterface = \"eth0\"\n";
    let (line, col, field, msg) = field_error(text);
    assert_eq!(
        (line, col, field.as_str()),
        (6, 13, "rootlets[1].interface")
    );
    assert!(msg.contains("already targeted on line 4"), "{msg}");

    // The same interface in another namespace is another rootlet.
    let text = "name = \"x\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\n[[rootlets]]\ninterface = \"eth0\"\nnetns = \"/run/netns/a\"\n";
    assert!(Manifest::parse(text, "m.toml").is_ok());
}

#[test]
fn lease_needs_lease_seconds() {
    let (line, col, field, msg) =
        field_error(&with_stage(&format!("{STAGE}lifetime = \"lease\"\n")));
    assert_eq!(
        (line, col, field.as_str()),
        (11, 12, "stages[0].lease_seconds")
    );
    assert_eq!(msg, "required when lifetime = \"lease\"");
}

#[test]
fn lease_seconds_only_with_lease() {
    let (line, col, field, _) = field_error(&with_stage(&format!("{STAGE}lease_seconds = 5\n")));
    assert_eq!(
        (line, col, field.as_str()),
        (11, 17, "stages[0].lease_seconds")
    );

    let (line, col, field, _) = field_error(&with_stage(&format!(
        "{STAGE}lifetime = \"pin\"\nlease_seconds = 5\n"
    )));
    assert_eq!(
        (line, col, field.as_str()),
        (12, 17, "stages[0].lease_seconds")
    );
}

#[test]
fn lease_seconds_range() {
    for bad in ["0", "86401", "-1", "99999999999"] {
        let (line, col, field, msg) = field_error(&with_stage(&format!(
            "{STAGE}lifetime = \"lease\"\nlease_seconds = {bad}\n"
        )));
        assert_eq!(
            (line, col, field.as_str()),
            (12, 17, "stages[0].lease_seconds"),
            "{bad}"
        );
        assert_eq!(msg, "must be between 1 and 86400");
    }
    let ok = with_stage(&format!(
        "{STAGE}lifetime = \"lease\"\nlease_seconds = 86400\n"
    ));
    assert!(Manifest::parse(&ok, "m.toml").is_ok());
}

#[test]
fn unknown_lifetime() {
    let (line, col, field, msg) =
        field_error(&with_stage(&format!("{STAGE}lifetime = \"forever\"\n")));
    assert_eq!((line, col, field.as_str()), (11, 12, "stages[0].lifetime"));
    assert!(msg.contains("\"forever\""), "{msg}");
}

#[test]
fn unknown_action_points_at_the_element() {
    let (line, col, field, msg) = field_error(&with_stage(&format!(
        "{STAGE}proceed_on = [\"pass\", \"PASS\"]\n"
    )));
    assert_eq!(
        (line, col, field.as_str()),
        (11, 23, "stages[0].proceed_on[1]")
    );
    assert_eq!(
        msg,
        "unknown value \"PASS\"; expected one of \"aborted\", \"drop\", \"pass\", \"tx\", \"redirect\""
    );

    let (line, col, field, msg) = field_error(&with_stage(&format!(
        "{STAGE}proceed_on = [\"drop\", \"drop\"]\n"
    )));
    assert_eq!(
        (line, col, field.as_str()),
        (11, 23, "stages[0].proceed_on[1]")
    );
    assert_eq!(msg, "\"drop\" is listed twice");

    let text = "name = \"x\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\nfinal_verdict = \"accept\"\n";
    let (line, col, field, _) = field_error(text);
    assert_eq!(
        (line, col, field.as_str()),
        (5, 17, "rootlets[0].final_verdict")
    );
}

#[test]
fn unknown_mode_and_maps() {
    let text =
        "name = \"x\"\nversion = \"1\"\n[[rootlets]]\ninterface = \"eth0\"\nmode = \"skb\"\n";
    let (line, col, field, _) = field_error(text);
    assert_eq!((line, col, field.as_str()), (5, 8, "rootlets[0].mode"));

    let (line, col, field, _) = field_error(&with_stage(&format!("{STAGE}maps = \"share\"\n")));
    assert_eq!((line, col, field.as_str()), (11, 8, "stages[0].maps"));
}

#[test]
fn stage_rootlets_must_be_targeted() {
    let (line, col, field, msg) = field_error(&with_stage(&format!(
        "{STAGE}rootlets = [\"eth0\", \"eth9\"]\n"
    )));
    assert_eq!(
        (line, col, field.as_str()),
        (11, 21, "stages[0].rootlets[1]")
    );
    assert_eq!(msg, "no rootlet of this bundle is on interface \"eth9\"");

    let (line, col, field, _) = field_error(&with_stage(&format!("{STAGE}rootlets = []\n")));
    assert_eq!((line, col, field.as_str()), (11, 12, "stages[0].rootlets"));
}

#[test]
fn names_and_values_are_checked() {
    let (line, col, field, _) = field_error(&FULL.replace("edge-pipeline", "edge pipeline"));
    assert_eq!((line, col, field.as_str()), (2, 8, "name"));

    let (line, col, field, _) = field_error(&FULL.replace("\"1.4.0\"", "\"\""));
    assert_eq!((line, col, field.as_str()), (3, 11, "version"));

    let (line, col, field, _) = field_error(&FULL.replace("name = \"ddos\"", "name = \"dd/os\""));
    assert_eq!((line, col, field.as_str()), (15, 8, "stages[0].name"));

    let (line, col, field, _) = field_error(&FULL.replace("/run/netns/edge", "edge"));
    assert_eq!((line, col, field.as_str()), (7, 9, "rootlets[0].netns"));

    let (line, col, field, _) = field_error(&FULL.replace("\"eth1\"", "\"a-very-long-ifname\""));
    assert_eq!(
        (line, col, field.as_str()),
        (12, 13, "rootlets[1].interface")
    );

    let (line, col, field, msg) =
        field_error(&FULL.replace("priority = 20", "priority = 3000000000"));
    assert_eq!((line, col, field.as_str()), (18, 12, "stages[0].priority"));
    assert!(msg.contains("out of range"), "{msg}");

    let (line, col, field, _) = field_error(&FULL.replace("priority = 20", "priority = 2.5"));
    assert_eq!((line, col, field.as_str()), (18, 12, "stages[0].priority"));

    let (line, col, field, _) = field_error(&FULL.replace("\"team-ddos\"", "\"team\\u0007\""));
    assert_eq!((line, col, field.as_str()), (23, 9, "stages[0].owner"));

    let (line, col, field, _) = field_error(&FULL.replace("\"objs/ddos.o\"", "\"objs/\""));
    assert_eq!((line, col, field.as_str()), (16, 10, "stages[0].object"));

    let (line, col, field, _) = field_error(
        &FULL
            .replace("sha256", "")
            .replace("program = \"l4lb\"", "program = \"l4lb\"\nsha256 = \"ABC\""),
    );
    assert_eq!((line, col, field.as_str()), (30, 10, "stages[1].sha256"));
}

#[test]
fn columns_count_characters_not_bytes() {
    let text =
        "name = \"x\"\nversion = \"ü\"\nrootlets = [{ interface = \"éé\", mode = \"fast\" }]\n";
    let (line, col, field, _) = field_error(text);
    assert_eq!((line, col, field.as_str()), (3, 40, "rootlets[0].mode"));
}

#[test]
fn embedded_manifests_need_sha256_and_plain_object_names() {
    let stage = format!("{STAGE}sha256 = \"{}\"\n", "ab".repeat(32));
    let text = with_stage(&stage);
    assert!(Manifest::parse_embedded(&text, "bundle:manifest.toml").is_ok());

    let text = with_stage(STAGE);
    match Manifest::parse_embedded(&text, "bundle:manifest.toml") {
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field {
            line: 5,
            col: 1,
            field,
            ..
        })) => assert_eq!(field, "stages[0].sha256"),
        other => panic!("expected a missing sha256, got {other:?}"),
    }

    let text = with_stage(&stage.replace("\"a.o\"", "\"dir/a.o\""));
    match Manifest::parse_embedded(&text, "bundle:manifest.toml") {
        Err(BundleError::Manifest(rootlet_bundle::located::LocatedError::Field {
            line: 7,
            col: 10,
            field,
            ..
        })) => assert_eq!(field, "stages[0].object"),
        other => panic!("expected a bad object name, got {other:?}"),
    }
}

#[test]
fn of_two_unknown_keys_the_first_written_is_reported() {
    // In file order, not key order ("zeta" sorts after "alpha").
    let (line, col, field, msg) =
        field_error(&with_stage(&format!("{STAGE}zeta = 1\nalpha = 2\n")));
    assert_eq!((line, col, field.as_str()), (11, 1, "stages[0].zeta"));
    assert!(
        msg.starts_with("unknown key; expected one of name, object"),
        "{msg}"
    );

    let (line, col, field, _) = field_error(&format!("zz = 1\naa = 2\n{FULL}"));
    assert_eq!((line, col, field.as_str()), (1, 1, "zz"));

    // In an inline table, at the key.
    let text =
        "name = \"x\"\nversion = \"1\"\nrootlets = [{ interface = \"lo\", zz = 1, aa = 2 }]\n";
    let (line, col, field, _) = field_error(text);
    assert_eq!((line, col, field.as_str()), (3, 33, "rootlets[0].zz"));
}

#[test]
fn wrong_types_nested_in_a_stage_point_at_the_value() {
    let cases = [
        // (the stage's extra line, line, col, field, message)
        (
            "proceed_on = \"pass\"",
            11,
            14,
            "stages[0].proceed_on",
            "expected an array, found a string",
        ),
        (
            "proceed_on = [\"pass\", 3]",
            11,
            23,
            "stages[0].proceed_on[1]",
            "expected a string, found an integer",
        ),
        (
            "lease_seconds = \"5\"",
            11,
            17,
            "stages[0].lease_seconds",
            "expected an integer, found a string",
        ),
        (
            "rootlets = [\"eth0\", { a = 1 }]",
            11,
            21,
            "stages[0].rootlets[1]",
            "expected a string, found a table",
        ),
        (
            "policies = [true]",
            11,
            13,
            "stages[0].policies[0]",
            "expected a string, found a boolean",
        ),
    ];
    for (extra, line, col, field, msg) in cases {
        let got = field_error(&with_stage(&format!("{STAGE}{extra}\n")));
        assert_eq!(
            got,
            (line, col, field.to_string(), msg.to_string()),
            "{extra}"
        );
    }
    // A stage that is not a table.
    let text = "name = \"x\"\nversion = \"1\"\nrootlets = [{ interface = \"lo\" }]\nstages = [1]\n";
    let (line, col, field, msg) = field_error(text);
    assert_eq!((line, col, field.as_str()), (4, 11, "stages[0]"));
    assert_eq!(msg, "expected a table, found an integer");
}

#[test]
fn a_missing_key_of_an_inline_table_points_at_the_table() {
    let text = "name = \"x\"\nversion = \"1\"\nrootlets = [{ interface = \"lo\" }]\n\
                stages = [{ name = \"a\", object = \"a.o\", program = \"p\", owner = \"o\" }]\n";
    let (line, col, field, msg) = field_error(text);
    assert_eq!((line, col, field.as_str()), (4, 11, "stages[0].priority"));
    assert_eq!(msg, "missing required key");
    let e = Manifest::parse(text, "m.toml").err().map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("m.toml:4:11: stages[0].priority: missing required key")
    );
}

#[test]
fn no_serde_private_names_in_paths() {
    let texts = [
        with_stage(&STAGE.replace("priority = 1", "priority = \"1\"")),
        with_stage(&STAGE.replace("owner = \"me\"\n", "")),
        with_stage(&format!("{STAGE}pin = 1\n")),
        with_stage(&format!("{STAGE}proceed_on = [1]\n")),
    ];
    for text in &texts {
        let e = Manifest::parse(text, "m.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("m.toml:"), "{e}");
        assert!(!e.contains("serde"), "{e}");
        assert!(!e.contains('$'), "{e}");
    }
}
