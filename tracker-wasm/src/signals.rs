//! Consent signals the page already has, mapped to our purposes: Global Privacy Control, an
//! IAB TCF v2.2 CMP (`__tcfapi`) and Google Consent Mode v2 (`dataLayer` consent commands).
//! The loader reads them into bit masks; the table is in the crate documentation.

use crate::consent::{ANALYTICS, MARKETING, PERSONALIZATION, Update};

/// `navigator.globalPrivacyControl === true`: a default of marketing denied (the visitor
/// opts out of sale and sharing; an explicit decision still wins).
pub fn gpc(enabled: bool) -> Update {
    Update {
        grant: 0,
        deny: if enabled { MARKETING } else { 0 },
    }
}

/// Bit `n` set: TCF purpose `n`.
const fn tcf_bits(purposes: &[u8]) -> u16 {
    let mut bits = 0;
    let mut i = 0;
    while i < purposes.len() {
        bits |= 1 << purposes[i];
        i += 1;
    }
    bits
}

/// The TCF v2.2 purposes that must all have consent for each of our purposes.
pub const TCF_PURPOSES: [(u8, u16); 3] = [
    // 1 store/access information on a device, 8 measure content performance,
    // 9 understand audiences through statistics.
    (ANALYTICS, tcf_bits(&[1, 8, 9])),
    // 1, 5 create profiles to personalise content, 6 use them to select content.
    (PERSONALIZATION, tcf_bits(&[1, 5, 6])),
    // 1, 3 create profiles for personalised advertising, 4 use them to select ads.
    (MARKETING, tcf_bits(&[1, 3, 4])),
];

/// A TCF decision: `consents` has bit `n` set when `tcData.purpose.consents[n]` is true
/// (sent once the CMP has loaded or the visitor has acted, and only where GDPR applies).
pub fn tcf(consents: u16) -> Update {
    let mut grant = 0;
    for &(bit, needed) in &TCF_PURPOSES {
        if consents & needed == needed {
            grant |= bit;
        }
    }
    // A TCF decision covers our three optional purposes: what is not granted is denied.
    Update {
        grant,
        deny: (ANALYTICS | PERSONALIZATION | MARKETING) & !grant,
    }
}

/// Consent Mode keys as the loader's bits: `analytics_storage`, `personalization_storage`,
/// `ad_user_data`, `ad_personalization`.
pub const GCM_KEYS: [&str; 4] = [
    "analytics_storage",
    "personalization_storage",
    "ad_user_data",
    "ad_personalization",
];

/// Google Consent Mode v2 state, merged over the commands seen so far (an `update` often
/// names only what changed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcm {
    granted: u8,
    denied: u8,
}

impl Gcm {
    /// No command seen yet.
    pub const NONE: Gcm = Gcm {
        granted: 0,
        denied: 0,
    };

    /// Merges one command (bit `i` of `granted`/`denied`: key `GCM_KEYS[i]` is
    /// `'granted'`/`'denied'`) and returns the state for the purposes it speaks about:
    /// analytics from `analytics_storage`, personalization from `personalization_storage`,
    /// marketing granted when `ad_user_data` and `ad_personalization` both are, denied when
    /// either is.
    pub fn command(&mut self, granted: u8, denied: u8) -> Update {
        // Merged so that no key is both granted and denied.
        let g = (self.granted | granted) & !denied;
        let d = (self.denied | denied) & !granted;
        self.granted = g;
        self.denied = d;
        // Key bits 1 and 2 are purpose bits 2 and 4; marketing needs both ad keys (bits 4
        // and 8) granted, and either denied denies it.
        let marketing = |on: bool| if on { MARKETING } else { 0 };
        Update {
            grant: (g & 3) << 1 | marketing(g & 12 == 12),
            deny: (d & 3) << 1 | marketing(d & 12 != 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(grant: u8, deny: u8) -> Update {
        Update { grant, deny }
    }

    #[test]
    fn gpc_denies_marketing_only() {
        assert_eq!(gpc(true), update(0, MARKETING));
        assert_eq!(gpc(false), Update::default());
    }

    #[test]
    fn tcf_grants_a_purpose_only_when_all_its_tcf_purposes_have_consent() {
        let bits = |ps: &[u8]| ps.iter().fold(0u16, |b, p| b | 1 << p);
        assert_eq!(
            tcf(bits(&[1, 8, 9, 5, 3])),
            update(ANALYTICS, PERSONALIZATION | MARKETING)
        );
        assert_eq!(
            tcf(bits(&[1, 3, 4, 5, 6, 7, 8, 9, 10, 11])),
            update(ANALYTICS | PERSONALIZATION | MARKETING, 0)
        );
        // Without purpose 1 (storage), nothing is granted.
        assert_eq!(
            tcf(bits(&[3, 4, 5, 6, 8, 9])),
            update(0, ANALYTICS | PERSONALIZATION | MARKETING)
        );
    }

    #[test]
    fn gcm_merges_commands_and_needs_both_ad_signals_for_marketing() {
        let mut g = Gcm::default();
        // analytics_storage denied, ad_user_data granted.
        assert_eq!(g.command(4, 1), update(0, ANALYTICS));
        // analytics_storage and ad_personalization granted: marketing too.
        assert_eq!(g.command(1 | 8, 0), update(ANALYTICS | MARKETING, 0));
        // ad_user_data denied.
        assert_eq!(g.command(0, 4), update(ANALYTICS, MARKETING));
        // personalization_storage granted; the rest as before.
        assert_eq!(
            g.command(2, 0),
            update(ANALYTICS | PERSONALIZATION, MARKETING)
        );
    }
}
