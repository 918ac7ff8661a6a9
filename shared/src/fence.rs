//! The sync lease's term as a fencing token: each taking of the lease starts a new term, every
//! write of a sync carries the term it was made under, and a document written under a newer
//! term refuses writes of an older one. So a holder that lost the lease (frozen past it,
//! cut off from MongoDB) and resumes changes nothing another holder has written since.

use bson::{doc, Document};

/// The field of a record or sync status that holds the term of its last write.
pub const FIELD: &str = "sync_term";

/// A term of the sync lease. Terms only grow; `Term(0)` is "no lease taken yet" (documents
/// written before terms existed count as term 0 as well).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub i64);

impl Term {
    /// The filter condition (on [`FIELD`]) of a write made under this term: the document was
    /// last written under this term or an older one, or under none (`$not` matches a missing
    /// field too).
    pub fn admits(self) -> Document {
        doc! { "$not": { "$gt": self.0 } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_admits_documents_of_its_own_or_older_terms() {
        assert_eq!(Term(7).admits(), doc! { "$not": { "$gt": 7_i64 } });
        assert!(Term(1) > Term::default());
    }
}
