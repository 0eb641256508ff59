-- Migration 7: event tags, for decisions across aggregates (see the
-- PostgreSQL backend's migration 10). Events without tags write nothing
-- here.

CREATE TABLE IF NOT EXISTS {tags} (
    tag      TEXT    NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (tag, position)
) WITHOUT ROWID;
