//! [`Reach`]: how a registered provider is reached, the typed form of its record's `base_url`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::NodeId;

/// How the registry's `base_url` names a provider reached through its owner.
const THROUGH: &str = "mesh://node-";

/// Where a provider in the registry is reached: at its URL, or only through the node that owns
/// it (on the actor mesh, when the provider listens where only that node can reach it).
/// Recorded as the URL, or as `mesh://node-<id>`, exactly as before this type existed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reach {
    Direct(String),
    Through(NodeId),
}

impl Reach {
    /// The reach a recorded `base_url` says.
    pub fn parse(base_url: &str) -> Reach {
        match base_url
            .strip_prefix(THROUGH)
            .and_then(|id| id.parse().ok())
        {
            Some(node) => Reach::Through(node),
            None => Reach::Direct(base_url.to_owned()),
        }
    }
}

impl Default for Reach {
    fn default() -> Self {
        Reach::Direct(String::new())
    }
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reach::Direct(url) => f.write_str(url),
            Reach::Through(node) => write!(f, "{THROUGH}{node}"),
        }
    }
}

impl Serialize for Reach {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reach {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Ok(Reach::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written by a node of an earlier version reads the same, and is written back
    /// byte for byte.
    #[test]
    fn reads_and_writes_the_recorded_base_url() {
        for (text, reach) in [
            ("\"mesh://node-3\"", Reach::Through(3)),
            (
                "\"http://10.0.0.2:8000/v1\"",
                Reach::Direct("http://10.0.0.2:8000/v1".into()),
            ),
            // Not a node id: an address like any other (refused when it is dialled).
            ("\"mesh://node-x\"", Reach::Direct("mesh://node-x".into())),
        ] {
            let read: Reach = serde_json::from_str(text).unwrap();
            assert_eq!(read, reach, "{text}");
            assert_eq!(serde_json::to_string(&read).unwrap(), text);
        }
    }
}
