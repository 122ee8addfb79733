//! The contract's rules that tracker and collector both apply.

use wire::{EventKind, Purpose};

#[test]
fn each_kind_needs_its_least_purpose() {
    use EventKind::*;
    for kind in [
        Page,
        Track,
        Identify,
        Alias,
        ProductViewed,
        CartAdd,
        CartRemove,
        CheckoutStarted,
        OrderCompleted,
    ] {
        assert_eq!(kind.least_purpose(), Purpose::Analytics, "{kind:?}");
    }
    assert_eq!(EmailOpened.least_purpose(), Purpose::Marketing);
    assert_eq!(EmailClicked.least_purpose(), Purpose::Marketing);
    assert_eq!(ConsentChange.least_purpose(), Purpose::Necessary);
}
