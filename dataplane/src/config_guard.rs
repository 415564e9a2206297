//! Configuration that cannot go backwards. A data plane remembers which store its configuration came from (the
//! control plane's `store_id`) and at which store revision; a response from another store, or from the same store
//! at an older revision, is refused (NACKed, the last good snapshot kept) unless an operator allowed it. Without
//! this, a control plane started on an empty or lost volume would wipe the whole fleet's configuration at once.

/// What the data plane holds: the store identity (empty when the control plane that sent it did not name its store,
/// or the snapshot file predates store identities) and the store revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub store_id: String,
    pub system_version: u64,
}

/// Why a response is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the control plane serves store `{offered}` but this data plane holds revision {held_revision} of store `{held}`"
    )]
    OtherStore { held: String, held_revision: u64, offered: String },
    #[error(
        "the control plane offers revision {offered} of {store} but this data plane holds revision {held}; a control plane behind its store (restored from an old backup, or a new empty store) would roll the configuration back"
    )]
    Older { store: String, held: u64, offered: u64 },
}

/// Decides whether a response computed from `offered_store` at `offered_revision` may replace what is `held`.
/// A data plane holding nothing accepts anything. An empty store identity on either side means "unknown": then only
/// the revision is compared.
pub fn check(held: Option<&Held>, offered_store: &str, offered_revision: u64) -> Result<(), Refusal> {
    let Some(held) = held else { return Ok(()) };
    if !held.store_id.is_empty() && !offered_store.is_empty() && held.store_id != offered_store {
        return Err(Refusal::OtherStore {
            held: held.store_id.clone(),
            held_revision: held.system_version,
            offered: offered_store.to_owned(),
        });
    }
    if offered_revision < held.system_version {
        let store =
            if offered_store.is_empty() { "an unnamed store".to_owned() } else { format!("store `{offered_store}`") };
        return Err(Refusal::Older { store, held: held.system_version, offered: offered_revision });
    }
    Ok(())
}

/// The store identity to remember after accepting a response from `offered_store`: a response that names no store
/// keeps the identity held (same store as far as anyone can tell, since its revision did not go back), unless the
/// operator overrode a refusal, in which case what was held no longer describes the configuration.
pub fn next_store_id(held: Option<&Held>, offered_store: &str, overridden: bool) -> String {
    match held {
        Some(held) if offered_store.is_empty() && !overridden => held.store_id.clone(),
        _ => offered_store.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(store: &str, revision: u64) -> Option<Held> {
        Some(Held { store_id: store.to_owned(), system_version: revision })
    }

    #[test]
    fn decisions() {
        // (held, offered store, offered revision, accepted)
        let cases: &[(Option<Held>, &str, u64, bool)] = &[
            (None, "", 0, true),
            (None, "s1", 0, true),
            (None, "s2", 7, true),
            (held("s1", 29), "s1", 29, true),
            (held("s1", 29), "s1", 30, true),
            (held("s1", 29), "s1", 28, false),
            (held("s1", 29), "s1", 0, false),
            (held("s1", 29), "s2", 30, false),
            (held("s1", 29), "s2", 29, false),
            (held("s1", 29), "s2", 0, false),
            // The control plane does not name its store (older control plane): revision only.
            (held("s1", 29), "", 29, true),
            (held("s1", 29), "", 31, true),
            (held("s1", 29), "", 0, false),
            // The snapshot predates store identities: revision only.
            (held("", 29), "s1", 29, true),
            (held("", 29), "s1", 3, false),
            (held("", 0), "", 0, true),
        ];
        for (held, store, revision, accepted) in cases {
            let got = check(held.as_ref(), store, *revision);
            assert_eq!(got.is_ok(), *accepted, "{held:?} offered {store:?}@{revision}: {got:?}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let Err(other) = check(held("s1", 29).as_ref(), "s2", 40) else { panic!("accepted") };
        assert!(matches!(other, Refusal::OtherStore { .. }));
        assert!(other.to_string().contains("`s2`") && other.to_string().contains("revision 29"), "{other}");
        let Err(older) = check(held("s1", 29).as_ref(), "", 0) else { panic!("accepted") };
        assert!(older.to_string().contains("offers revision 0") && older.to_string().contains("holds revision 29"));
    }

    #[test]
    fn store_identity_after_accepting() {
        let cases: &[(Option<Held>, &str, bool, &str)] = &[
            (None, "", false, ""),
            (None, "s1", false, "s1"),
            (held("s1", 3), "", false, "s1"),
            (held("s1", 3), "s1", false, "s1"),
            (held("s1", 3), "", true, ""),
            (held("s1", 3), "s2", true, "s2"),
            (held("", 3), "s2", false, "s2"),
        ];
        for (held, offered, overridden, want) in cases {
            assert_eq!(next_store_id(held.as_ref(), offered, *overridden), *want, "{held:?} {offered:?} {overridden}");
        }
    }
}
