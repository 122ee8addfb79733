//! The consent gate: per purpose pending, granted or denied; the purpose each event kind
//! needs; whether an event may be sent, must wait, or is dropped.
//!
//! Two layers make up the state. *Decisions* are what the visitor chose (through the page's
//! `pz.consent()`, a TCF CMP or a Consent Mode `update`); they are persisted and every change
//! of them is sent as a `consent_change` event. *Defaults* come from the site's
//! `consentDefaults`, Global Privacy Control and Consent Mode `default` commands; they apply
//! where the visitor has not decided, are not persisted and are not audited as changes (they
//! arrive again on every page). `necessary` is always granted.

/// The `necessary` bit of a purpose mask.
pub const NECESSARY: u8 = 1;
/// The `analytics` bit.
pub const ANALYTICS: u8 = 2;
/// The `personalization` bit.
pub const PERSONALIZATION: u8 = 4;
/// The `marketing` bit.
pub const MARKETING: u8 = 8;
/// Every purpose.
pub const ALL: u8 = 15;

/// The state of one purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not decided: events that need it wait in memory.
    Pending,
    /// Granted: events that need it are sent.
    Granted,
    /// Denied: events that need it are dropped.
    Denied,
}

/// A requested change: purposes to grant and purposes to deny (bit masks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Update {
    /// Purposes to grant.
    pub grant: u8,
    /// Purposes to deny.
    pub deny: u8,
}

/// What an event needs to be sent and what to do with it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Every purpose it needs is granted.
    Send,
    /// Some purpose it needs is pending, none is denied: hold it in memory.
    Hold,
    /// Some purpose it needs is denied.
    Drop,
}

/// Consent state: the visitor's decisions over the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Consent {
    decided_granted: u8,
    decided_denied: u8,
    default_granted: u8,
    default_denied: u8,
}

impl Consent {
    /// Nothing decided, no defaults: everything but `necessary` pending.
    pub const NONE: Consent = Consent {
        decided_granted: 0,
        decided_denied: 0,
        default_granted: 0,
        default_denied: 0,
    };

    /// Purposes granted now (always includes `necessary`).
    pub fn granted(&self) -> u8 {
        let decided = self.decided_granted | self.decided_denied;
        NECESSARY | self.decided_granted | (self.default_granted & !decided)
    }

    /// Purposes denied now.
    pub fn denied(&self) -> u8 {
        let decided = self.decided_granted | self.decided_denied;
        (self.decided_denied | (self.default_denied & !decided)) & !NECESSARY
    }

    /// Purposes pending now.
    pub fn pending(&self) -> u8 {
        ALL & !self.granted() & !self.denied()
    }

    /// The state of the purposes in `bit`.
    pub fn state(&self, bit: u8) -> State {
        if self.granted() & bit == bit {
            State::Granted
        } else if self.denied() & bit != 0 {
            State::Denied
        } else {
            State::Pending
        }
    }

    /// What to do with an event that needs the purposes in `need`.
    pub fn gate(&self, need: u8) -> Gate {
        match self.state(need) {
            State::Granted => Gate::Send,
            State::Denied => Gate::Drop,
            State::Pending => Gate::Hold,
        }
    }

    /// Whether the anonymous id and the queue may be kept in localStorage: analytics or
    /// personalization is granted.
    pub fn storage_allowed(&self) -> bool {
        self.granted() & (ANALYTICS | PERSONALIZATION) != 0
    }

    /// Applies the visitor's decision. Returns whether the decisions changed (so a
    /// `consent_change` event is due). `necessary` cannot be denied.
    pub fn decide(&mut self, u: Update) -> bool {
        let before = *self;
        self.decided_granted = (self.decided_granted | u.grant) & !u.deny;
        self.decided_denied = (self.decided_denied | u.deny) & !u.grant & !NECESSARY;
        (self.decided_granted, self.decided_denied)
            != (before.decided_granted, before.decided_denied)
    }

    /// Sets defaults for the purposes `u` names; they matter only where nothing is decided.
    pub fn set_default(&mut self, u: Update) {
        self.default_granted = (self.default_granted | u.grant) & !u.deny;
        self.default_denied = (self.default_denied | u.deny) & !u.grant;
    }

    /// The decisions as stored in localStorage: the granted mask, then the denied mask.
    pub fn encode_decisions(&self) -> [u8; 2] {
        [self.decided_granted, self.decided_denied]
    }

    /// Replaces the decisions with stored ones; ignores anything that is not
    /// [`encode_decisions`](Self::encode_decisions) output.
    pub fn load_decisions(&mut self, stored: &[u8]) {
        if let [g, d] = *stored {
            self.decided_granted = g & ALL;
            self.decided_denied = d & ALL & !NECESSARY & !self.decided_granted;
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
    fn everything_but_necessary_starts_pending() {
        let c = Consent::default();
        assert_eq!(c.granted(), NECESSARY);
        assert_eq!(c.denied(), 0);
        assert_eq!(c.pending(), ANALYTICS | PERSONALIZATION | MARKETING);
        assert_eq!(c.gate(NECESSARY), Gate::Send);
        assert_eq!(c.gate(ANALYTICS), Gate::Hold);
        assert!(!c.storage_allowed());
    }

    #[test]
    fn decisions_override_defaults_and_report_changes() {
        let mut c = Consent::default();
        c.set_default(update(ANALYTICS, MARKETING));
        assert_eq!(c.state(ANALYTICS), State::Granted);
        assert_eq!(c.state(MARKETING), State::Denied);
        assert!(c.storage_allowed());

        assert!(c.decide(update(MARKETING, ANALYTICS)));
        assert_eq!(c.state(ANALYTICS), State::Denied);
        assert_eq!(c.state(MARKETING), State::Granted);
        assert!(!c.storage_allowed());
        // The same decision again is no change.
        assert!(!c.decide(update(MARKETING, ANALYTICS)));
        // A new default does not move a decided purpose.
        c.set_default(update(ANALYTICS, 0));
        assert_eq!(c.state(ANALYTICS), State::Denied);
    }

    #[test]
    fn necessary_cannot_be_denied() {
        let mut c = Consent::default();
        assert!(!c.decide(update(0, NECESSARY)));
        c.set_default(update(0, ALL));
        assert_eq!(c.granted(), NECESSARY);
        assert_eq!(c.gate(NECESSARY), Gate::Send);
    }

    #[test]
    fn an_event_needing_two_purposes_waits_for_both_and_drops_on_either_denial() {
        let mut c = Consent::default();
        let need = ANALYTICS | MARKETING;
        c.decide(update(ANALYTICS, 0));
        assert_eq!(c.gate(need), Gate::Hold);
        c.decide(update(MARKETING, 0));
        assert_eq!(c.gate(need), Gate::Send);
        c.decide(update(0, MARKETING));
        assert_eq!(c.gate(need), Gate::Drop);
    }

    #[test]
    fn decisions_survive_storage_and_bad_text_is_ignored() {
        let mut c = Consent::default();
        c.decide(update(ANALYTICS | PERSONALIZATION, MARKETING));
        let stored = c.encode_decisions();
        assert_eq!(stored, [6, 8]);
        let mut d = Consent::default();
        d.load_decisions(&stored);
        assert_eq!((d.granted(), d.denied()), (c.granted(), c.denied()));
        let mut e = Consent::default();
        e.load_decisions(b"6.8");
        e.load_decisions(&[7]);
        assert_eq!(e, Consent::default());
    }
}
