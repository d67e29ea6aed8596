//! `--exclude` and `--exclude-from`: gitignore-style patterns (the `ignore` crate's matcher) that leave parts of a tree transfer out.
//!
//! Patterns match a path inside the transfer as the receiving side will
//! name it, starting with the top directory's own name: `put -r photos`
//! offers `photos/2026/a.jpg`. As in .gitignore, a pattern without a slash
//! matches a name at any depth (`*.tmp`, `node_modules/`), one with a slash
//! inside is anchored at the top (`photos/raw`), a trailing slash matches
//! directories only, and `!pattern` takes back an earlier exclusion. An
//! excluded directory is neither entered nor created, so nothing beneath
//! it moves either.

use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// What a tree transfer leaves out.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    matcher: Option<Gitignore>,
}

/// A pattern or pattern file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FilterError {
    /// A pattern given with --exclude does not parse.
    #[error("--exclude {pattern:?}: {reason}; see `qxfer put --help` for the pattern syntax")]
    Pattern {
        /// As given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A line of an --exclude-from file does not parse.
    #[error("{}:{line}: pattern {pattern:?}: {reason}; fix the line or remove it", path.display())]
    FileLine {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The line's pattern.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An --exclude-from file cannot be read.
    #[error("--exclude-from {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Filter {
    /// Builds the filter from `--exclude` patterns (in order) and then the
    /// lines of each `--exclude-from` file (blank lines and `#` comments
    /// skipped, as in .gitignore).
    pub(crate) fn new(patterns: &[String], files: &[PathBuf]) -> Result<Self, FilterError> {
        if patterns.is_empty() && files.is_empty() {
            return Ok(Self::default());
        }
        let mut builder = GitignoreBuilder::new(Path::new(""));
        for pattern in patterns {
            builder
                .add_line(None, pattern)
                .map_err(|e| FilterError::Pattern {
                    pattern: pattern.clone(),
                    reason: e.to_string(),
                })?;
        }
        for path in files {
            let text = std::fs::read_to_string(path).map_err(|source| FilterError::Read {
                path: path.clone(),
                source,
            })?;
            for (i, line) in text.lines().enumerate() {
                builder
                    .add_line(Some(path.clone()), line)
                    .map_err(|e| FilterError::FileLine {
                        path: path.clone(),
                        line: i + 1,
                        pattern: line.to_owned(),
                        reason: e.to_string(),
                    })?;
            }
        }
        let matcher = builder.build().map_err(|e| FilterError::Pattern {
            pattern: patterns.join(" "),
            reason: e.to_string(),
        })?;
        Ok(Self {
            matcher: Some(matcher),
        })
    }

    /// Whether `rel` (a path inside the transfer, see the module docs) is
    /// left out, by a pattern of its own or of a directory above it.
    pub(crate) fn excludes(&self, rel: &str, is_dir: bool) -> bool {
        self.matcher.as_ref().is_some_and(|m| {
            m.matched_path_or_any_parents(Path::new(rel), is_dir)
                .is_ignore()
        })
    }

    /// Whether `rel` itself matches an exclusion (not only a directory above it).
    pub(crate) fn excludes_itself(&self, rel: &str, is_dir: bool) -> bool {
        self.matcher
            .as_ref()
            .is_some_and(|m| m.matched(Path::new(rel), is_dir).is_ignore())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(patterns: &[&str]) -> Filter {
        Filter::new(
            &patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn gitignore_rules_apply_inside_the_transfer() {
        let f = filter(&["*.tmp", "node_modules/", "top/raw", "!keep.tmp"]);
        assert!(f.excludes("top/a.tmp", false));
        assert!(f.excludes("top/deep/er/b.tmp", false));
        assert!(!f.excludes("top/keep.tmp", false), "re-included");
        assert!(f.excludes("top/x/node_modules", true));
        assert!(!f.excludes("top/x/node_modules", false), "directories only");
        assert!(
            f.excludes("top/x/node_modules/lib/a.js", false),
            "beneath one"
        );
        assert!(f.excludes("top/raw", true));
        assert!(!f.excludes("top/sub/raw", true), "anchored at the top");
        assert!(!f.excludes("top/a.txt", false));
        assert!(f.excludes_itself("top/raw", true));
        assert!(!f.excludes_itself("top/raw/x.jpg", false));
        assert!(Filter::default().matcher.is_none() && !Filter::default().excludes("a", false));
    }

    #[test]
    fn bad_patterns_and_files_are_named() {
        let err = Filter::new(&["a{b".into()], &[]).unwrap_err().to_string();
        assert!(err.starts_with("--exclude \"a{b\": "), "{err}");
        assert!(err.contains("unclosed"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("excludes");
        std::fs::write(&list, "# build output\ntarget/\n\nsrc/**/[z-a].rs\n").unwrap();
        let err = Filter::new(&[], std::slice::from_ref(&list))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("{}:4: ", list.display())), "{err}");
        let err = Filter::new(&[], &[dir.path().join("missing")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        std::fs::write(&list, "# build output\ntarget/\n").unwrap();
        let f = Filter::new(&[], &[list]).unwrap();
        assert!(f.excludes("top/target", true) && !f.excludes("top/src", true));
    }
}
