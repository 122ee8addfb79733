//! Page views: the dedupe that makes a single-page app's navigation (pushState,
//! replaceState, popstate and hashchange often fire together or repeat) count once per URL
//! change.

use alloc::string::String;

/// Remembers the URL of the last page view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageViews {
    last_url: Option<String>,
}

impl PageViews {
    /// Whether a page view at `url` is new (the URL differs from the last one counted);
    /// if so it becomes the last one.
    pub fn count(&mut self, url: &str) -> bool {
        if self.last_url.as_deref() == Some(url) {
            return false;
        }
        self.last_url = Some(url.into());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spa_navigation_counts_once_per_url_change() {
        let mut pv = PageViews::default();
        assert!(pv.count("/a"));
        // pushState then popstate/replaceState to the same URL: one view.
        assert!(!pv.count("/a"));
        assert!(pv.count("/b"));
        assert!(!pv.count("/b"));
        assert!(pv.count("/b#reviews"));
        assert!(pv.count("/a"));
    }
}
