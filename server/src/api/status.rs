//! The one mapping of errors to gRPC status codes (ours, and those tonic
//! makes itself: [`transport`]), with google.rpc error
//! details: `ErrorInfo` (a reason code and metadata) always, `BadRequest`
//! for invalid fields, `PreconditionFailure` for failed preconditions, and
//! `DebugInfo` carrying the end of the verifier log (at most
//! [`DEBUG_LOG_BYTES`] of it: a status travels in HTTP/2 trailers, and a
//! default client refuses more than 16 KiB of them; `GetVerifierLog`
//! returns the whole log).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use rootlet_agent::{AgentError, Denied};
use rootlet_dataplane::{Error as DpError, spec::PlanError};

const DOMAIN: &str = "rootlet.dev";

/// The most of a verifier log an error's `DebugInfo` carries.
pub const DEBUG_LOG_BYTES: usize = 4096;

/// `DebugInfo.detail` for a verifier log: all of a short one; of a long
/// one, its total size and its last lines.
fn log_detail(log: &str) -> String {
    let shown = super::verifier_logs::tail(log, DEBUG_LOG_BYTES);
    if shown.len() == log.len() {
        return log.to_owned();
    }
    format!(
        "[verifier log: {} bytes; its last {} shown; GetVerifierLog returns all of it]\n{shown}",
        log.len(),
        shown.len()
    )
}

fn info(details: &mut ErrorDetails, reason: &str, meta: &[(&str, String)]) {
    let metadata: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    details.set_error_info(reason, DOMAIN, metadata);
}

/// The code and reason of a failed pull from a registry.
fn fetch_code(failure: rootlet_agent::FetchFailure) -> (Code, &'static str) {
    use rootlet_agent::FetchFailure as F;
    match failure {
        F::Reference => (Code::InvalidArgument, "REGISTRY_REFERENCE"),
        F::NotAllowed => (Code::FailedPrecondition, "REGISTRY_NOT_ALLOWED"),
        F::NotFound => (Code::NotFound, "REGISTRY_NOT_FOUND"),
        F::Unavailable => (Code::Unavailable, "REGISTRY_UNAVAILABLE"),
        F::Tls => (Code::Unavailable, "REGISTRY_TLS"),
        // The agent's own credentials or files, not the caller's identity.
        F::Denied => (Code::FailedPrecondition, "REGISTRY_DENIED"),
        F::DigestMismatch => (Code::DataLoss, "REGISTRY_DIGEST_MISMATCH"),
        F::NotABundle => (Code::InvalidArgument, "REGISTRY_NOT_A_BUNDLE"),
        F::TooLarge => (Code::ResourceExhausted, "REGISTRY_TOO_LARGE"),
        F::Registry => (Code::Unavailable, "REGISTRY_ERROR"),
    }
}

/// The `ErrorInfo` reason [`status`] gives `e` (for metrics labels).
pub fn reason_of(e: &AgentError) -> &'static str {
    match e {
        AgentError::Fetch { failure, .. } => fetch_code(*failure).1,
        _ => "OTHER",
    }
}

/// The status for an agent error.
pub fn status(e: &AgentError) -> Status {
    let mut d = ErrorDetails::new();
    let msg = e.to_string();
    let code = match e {
        AgentError::Denied(Denied::Unauthenticated) => {
            info(&mut d, "UNAUTHENTICATED", &[]);
            Code::Unauthenticated
        }
        AgentError::Denied(Denied::PermissionDenied { who, what }) => {
            info(
                &mut d,
                "PERMISSION_DENIED",
                &[("identity", who.clone()), ("action", what.clone())],
            );
            Code::PermissionDenied
        }
        AgentError::Dataplane(dp) => return dataplane_status(dp, &msg),
        AgentError::InvalidArgument { field, message } => {
            d.add_bad_request_violation(field.clone(), message.clone());
            info(&mut d, "INVALID_ARGUMENT", &[]);
            Code::InvalidArgument
        }
        AgentError::NotFound(_) => {
            info(&mut d, "NOT_FOUND", &[]);
            Code::NotFound
        }
        AgentError::Bundle(b) => {
            use rootlet_bundle::BundleError as B;
            let (code, reason) = match b {
                B::Unsigned => (Code::FailedPrecondition, "BUNDLE_UNSIGNED"),
                B::UntrustedSignature { .. } => {
                    (Code::PermissionDenied, "BUNDLE_UNTRUSTED_SIGNATURE")
                }
                B::BadSignature { .. } => (Code::PermissionDenied, "BUNDLE_BAD_SIGNATURE"),
                B::TooLarge { .. } => (Code::ResourceExhausted, "BUNDLE_TOO_LARGE"),
                _ => (Code::InvalidArgument, "BUNDLE_INVALID"),
            };
            if code == Code::InvalidArgument {
                d.add_bad_request_violation("bundle", b.to_string());
            }
            info(&mut d, reason, &[]);
            code
        }
        AgentError::Policy(p) => {
            use rootlet_bundle::PolicyError as P;
            let (code, reason) = match p {
                P::Unsigned => (Code::FailedPrecondition, "POLICY_UNSIGNED"),
                P::UntrustedSignature { .. } => {
                    (Code::PermissionDenied, "POLICY_UNTRUSTED_SIGNATURE")
                }
                P::BadSignature { .. } => (Code::PermissionDenied, "POLICY_BAD_SIGNATURE"),
                P::TooLarge { .. } => (Code::ResourceExhausted, "POLICY_TOO_LARGE"),
                P::Io { .. } => (Code::Internal, "INTERNAL"),
                _ => (Code::InvalidArgument, "POLICY_INVALID"),
            };
            if code == Code::InvalidArgument {
                d.add_bad_request_violation("policy", p.to_string());
            }
            info(&mut d, reason, &[]);
            code
        }
        AgentError::Nack {
            name,
            version,
            rootlet,
            source,
            unrestored,
        } => {
            // The cause's code and details, with the bundle named.
            let inner = status(source);
            let mut details = inner.get_error_details();
            let mut meta: HashMap<String, String> = details
                .error_info()
                .map(|i| i.metadata.clone())
                .unwrap_or_default();
            meta.insert("bundle".into(), name.clone());
            meta.insert("version".into(), version.clone());
            meta.insert("rootlet".into(), rootlet.clone());
            if !unrestored.is_empty() {
                let which: Vec<&str> = unrestored.iter().map(|(k, _)| k.as_str()).collect();
                meta.insert("unrestored".into(), which.join(","));
            }
            let reason = details
                .error_info()
                .map(|i| i.reason.clone())
                .unwrap_or_else(|| "NACK".into());
            details.set_error_info(reason, DOMAIN, meta);
            return Status::with_error_details(inner.code(), msg, details);
        }
        // A concurrency conflict, not a broken precondition of the request:
        // ABORTED, which a caller retries from its read (google.rpc code
        // guidance); nothing changed.
        AgentError::OwnerChanged {
            rootlet,
            stage,
            read,
            now,
        } => {
            info(
                &mut d,
                "OWNER_CHANGED",
                &[
                    ("rootlet", rootlet.clone()),
                    ("stage", stage.clone()),
                    ("read_owner", read.clone().unwrap_or_default()),
                    ("current_owner", now.clone().unwrap_or_default()),
                ],
            );
            Code::Aborted
        }
        AgentError::NotManagedByBundle {
            rootlet,
            stage,
            bundle,
            owner,
        } => {
            d.add_precondition_failure_violation("STAGE_OWNERSHIP", stage.clone(), msg.clone());
            info(
                &mut d,
                "STAGE_NOT_MANAGED_BY_BUNDLE",
                &[
                    ("rootlet", rootlet.clone()),
                    ("stage", stage.clone()),
                    ("bundle", bundle.clone()),
                    ("owner", owner.clone()),
                ],
            );
            Code::FailedPrecondition
        }
        AgentError::ManagedByBundle {
            rootlet,
            stage,
            bundle,
        } => {
            d.add_precondition_failure_violation("STAGE_OWNERSHIP", stage.clone(), msg.clone());
            info(
                &mut d,
                "STAGE_MANAGED_BY_BUNDLE",
                &[
                    ("rootlet", rootlet.clone()),
                    ("stage", stage.clone()),
                    ("bundle", bundle.clone()),
                ],
            );
            Code::FailedPrecondition
        }
        AgentError::UndoContended { rootlet, .. } => {
            info(&mut d, "UNDO_CONTENDED", &[("rootlet", rootlet.clone())]);
            Code::Aborted
        }
        AgentError::Fetch {
            reference,
            failure,
            detail,
        } => {
            let (code, reason) = fetch_code(*failure);
            match code {
                Code::InvalidArgument => d.add_bad_request_violation("reference", detail.clone()),
                Code::FailedPrecondition => {
                    d.add_precondition_failure_violation(reason, reference.clone(), detail.clone())
                }
                _ => &mut d,
            };
            info(&mut d, reason, &[("reference", reference.clone())]);
            code
        }
        AgentError::InjectedFault(_) => {
            info(&mut d, "INJECTED_FAULT", &[]);
            Code::Internal
        }
        AgentError::PolicyVersionMismatch {
            stage,
            expected,
            current,
        } => {
            d.add_precondition_failure_violation("POLICY_VERSION", stage.clone(), msg.clone());
            info(
                &mut d,
                "POLICY_VERSION_MISMATCH",
                &[
                    ("stage", stage.clone()),
                    ("expected", expected.to_string()),
                    ("current", current.to_string()),
                ],
            );
            Code::FailedPrecondition
        }
        AgentError::NotCurrent { name, current, .. } => {
            d.add_precondition_failure_violation("BUNDLE_VERSION", name.clone(), msg.clone());
            info(
                &mut d,
                "BUNDLE_NOT_CURRENT",
                &[("bundle", name.clone()), ("current", current.clone())],
            );
            Code::FailedPrecondition
        }
        AgentError::DumpInterrupted { .. } => {
            info(&mut d, "POLICY_CHANGED_DURING_DUMP", &[]);
            Code::Aborted
        }
        AgentError::NoPolicyToRollBack { .. } => {
            d.add_precondition_failure_violation("POLICY_HISTORY", "to_version", msg.clone());
            info(&mut d, "NOTHING_TO_ROLL_BACK", &[]);
            Code::FailedPrecondition
        }
        AgentError::NothingToRollBack(_) => {
            d.add_precondition_failure_violation("HISTORY", "bundle", msg.clone());
            info(&mut d, "NOTHING_TO_ROLL_BACK", &[]);
            Code::FailedPrecondition
        }
        AgentError::IdempotencyConflict(key) => {
            d.add_bad_request_violation(
                "idempotency_key",
                format!("`{key}` was used for a different request"),
            );
            info(&mut d, "IDEMPOTENCY_KEY_REUSED", &[]);
            Code::InvalidArgument
        }
        AgentError::Store(_) | AgentError::TrustedKey { .. } => {
            info(&mut d, "INTERNAL", &[]);
            Code::Internal
        }
    };
    Status::with_error_details(code, msg, d)
}

/// A duplicate of an idempotent call whose first call ended without an
/// answer (its task died): ABORTED, reason IDEMPOTENT_CALL_LOST, which a
/// client retries with the same key (the key was never used: nothing was
/// stored).
pub fn leader_lost() -> Status {
    let mut d = ErrorDetails::new();
    info(&mut d, "IDEMPOTENT_CALL_LOST", &[]);
    Status::with_error_details(
        Code::Aborted,
        "the first call with this idempotency key ended without an answer; retry",
        d,
    )
}

/// A status tonic made itself (no handler ran), mapped like ours, or None
/// if it stands: a message over the size limit is RESOURCE_EXHAUSTED
/// (tonic says OUT_OF_RANGE), with reason MESSAGE_TOO_LARGE.
pub fn transport(s: &Status) -> Option<Status> {
    if s.code() != Code::OutOfRange || !s.message().contains("message length too large") {
        return None;
    }
    let mut d = ErrorDetails::new();
    info(&mut d, "MESSAGE_TOO_LARGE", &[]);
    Some(Status::with_error_details(
        Code::ResourceExhausted,
        s.message(),
        d,
    ))
}

fn dataplane_status(e: &DpError, msg: &str) -> Status {
    let mut d = ErrorDetails::new();
    let code = match e {
        DpError::InterfaceNotFound { ifname, .. } => {
            d.add_bad_request_violation("interface.ifname", format!("no interface `{ifname}`"));
            info(&mut d, "INTERFACE_NOT_FOUND", &[]);
            Code::NotFound
        }
        DpError::Netns { path, .. } => {
            d.add_bad_request_violation(
                "interface.netns",
                format!("cannot open {}", path.display()),
            );
            info(&mut d, "NETNS_NOT_FOUND", &[]);
            Code::NotFound
        }
        DpError::RootletExists(key) => {
            info(&mut d, "ROOTLET_EXISTS", &[("rootlet", key.to_string())]);
            Code::AlreadyExists
        }
        DpError::NoRootlet(key) => {
            info(&mut d, "ROOTLET_NOT_FOUND", &[("rootlet", key.to_string())]);
            Code::NotFound
        }
        DpError::Plan(p) => match p {
            PlanError::AlreadyLinked(s) => {
                info(&mut d, "STAGE_EXISTS", &[("stage", s.clone())]);
                Code::AlreadyExists
            }
            PlanError::NotLinked(s) => {
                info(&mut d, "STAGE_NOT_FOUND", &[("stage", s.clone())]);
                Code::NotFound
            }
            PlanError::Duplicate(s) | PlanError::InvalidName(s) => {
                d.add_bad_request_violation("stage.name", p.to_string());
                info(&mut d, "INVALID_STAGE_NAME", &[("stage", s.clone())]);
                Code::InvalidArgument
            }
            PlanError::TooManyStages { .. } => {
                info(&mut d, "TOO_MANY_STAGES", &[]);
                Code::ResourceExhausted
            }
        },
        DpError::Check { stage, source } => {
            d.add_bad_request_violation("stage.object", source.to_string());
            info(
                &mut d,
                "STAGE_CHECK_FAILED",
                &[
                    ("stage", stage.clone()),
                    ("check", check_name(source).into()),
                ],
            );
            Code::InvalidArgument
        }
        DpError::Verifier {
            stage,
            program,
            log,
            ..
        } => {
            d.add_bad_request_violation("stage.object", "the verifier rejected the program");
            d.set_debug_info(vec![], log_detail(log));
            info(
                &mut d,
                "VERIFIER_REJECTED",
                &[("stage", stage.clone()), ("program", program.clone())],
            );
            Code::InvalidArgument
        }
        DpError::Placement { stage, .. } => {
            d.add_precondition_failure_violation("PLACEMENT", stage.clone(), msg.to_owned());
            info(&mut d, "STAGE_PLACEMENT", &[("stage", stage.clone())]);
            Code::FailedPrecondition
        }
        DpError::BackendUnavailable { probe, .. } => {
            d.add_precondition_failure_violation("KERNEL", (*probe).to_owned(), msg.to_owned());
            info(
                &mut d,
                "BACKEND_UNAVAILABLE",
                &[("probe", (*probe).to_owned())],
            );
            Code::FailedPrecondition
        }
        DpError::ProgramsRejected {
            backend,
            kernel,
            program,
            log,
            ..
        } => {
            d.set_debug_info(vec![], log_detail(log));
            info(
                &mut d,
                "PROGRAMS_REJECTED",
                &[
                    ("backend", backend.to_string()),
                    ("kernel", kernel.clone()),
                    ("program", program.clone()),
                ],
            );
            Code::Internal
        }
        DpError::Drifted { key, reason } => {
            d.add_precondition_failure_violation("DRIFT", key.to_string(), reason.clone());
            info(&mut d, "DRIFTED", &[("rootlet", key.to_string())]);
            Code::FailedPrecondition
        }
        DpError::NoRollback { key, reason } => {
            d.add_precondition_failure_violation("ROLLBACK", key.to_string(), (*reason).to_owned());
            info(&mut d, "NO_INSTANT_ROLLBACK", &[]);
            Code::FailedPrecondition
        }
        DpError::VersionMismatch {
            key,
            expected,
            current,
        } => {
            d.add_precondition_failure_violation(
                "GENERATION",
                key.to_string(),
                format!("expected generation {expected}, current is {current}"),
            );
            info(
                &mut d,
                "GENERATION_MISMATCH",
                &[("current", current.to_string())],
            );
            Code::FailedPrecondition
        }
        DpError::Load { .. }
        | DpError::Sys(_)
        | DpError::Pin { .. }
        | DpError::Store { .. }
        | DpError::StoreLocked { .. } => {
            info(&mut d, "KERNEL_OR_STORE", &[]);
            Code::Internal
        }
        // The data plane's map operations (policies, DumpMap).
        DpError::Policy(p) => {
            use rootlet_dataplane::error::PolicyError as P;
            let (reason, code) = match p {
                P::NoMap { .. } => ("MAP_NOT_FOUND", Code::NotFound),
                P::Size { .. } | P::Duplicate { .. } => {
                    ("MAP_ENTRY_INVALID", Code::InvalidArgument)
                }
                P::TooMany { .. } => ("MAP_TOO_MANY_ENTRIES", Code::ResourceExhausted),
                P::Stale { .. } => ("MAP_STALE", Code::Aborted),
                P::NotPolicyMap { .. }
                | P::IsPolicyMap { .. }
                | P::Unsupported { .. }
                | P::NoLiveInner { .. } => ("MAP_KIND", Code::FailedPrecondition),
                // The kernel refused an entry as such (an array index past
                // its end, a value it will not take): the caller's to fix.
                P::Write { source, .. }
                    if matches!(source.errno(), Some(libc::E2BIG | libc::EINVAL)) =>
                {
                    ("MAP_ENTRY_REFUSED", Code::InvalidArgument)
                }
                P::Create { .. } | P::Write { .. } | P::Read { .. } | P::UndoFailed { .. } => {
                    ("MAP_KERNEL", Code::Internal)
                }
            };
            info(&mut d, reason, &[]);
            code
        }
    };
    Status::with_error_details(code, msg, d)
}

fn check_name(e: &rootlet_dataplane::object::CheckError) -> &'static str {
    use rootlet_dataplane::object::CheckError as C;
    match e {
        C::Elf(_) => "elf",
        C::NoProgram { .. } | C::ChainHalf { .. } => "program",
        C::NotXdp { .. } => "program_type",
        C::NoBtf => "btf",
        C::Signature(_) => "signature",
        C::IsRootlet => "cycle",
        C::License(_) => "license",
        C::Stack { .. } => "stack",
        C::IncompatibleMap { .. } | C::MapTypeChanged { .. } => "map_compatibility",
    }
}
