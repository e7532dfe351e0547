CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, grp INTEGER, v BLOB);
-- {scale} rows with text keys of 8-64 hex digits and blobs of 16 B to
-- 2 KiB in an in-memory database: inserts, two indexes, updates that
-- resize blobs, deletes, a self-join, grouped queries, more rows with
-- blobs up to 4 KiB, a vacuum.  sqlite3 takes its page cache and its
-- rows from malloc.  Keys and sizes come from the row number (a
-- multiplicative hash), so every run allocates the same sizes; only the
-- blobs' bytes are random.
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {scale})
INSERT INTO t SELECT x, substr(printf('%08x%08x%08x%08x%08x%08x%08x%08x',
                                      (x * 2654435761) % 4294967296, x * 40503, x * 12345,
                                      x * 7, x * 65537, x * 31, x * 97, x),
                               1, 8 + (x * 40503) % 57),
                     x % 97, randomblob(16 + (x * 2654435761) % 2033) FROM c;
CREATE INDEX t_k ON t(k);
CREATE INDEX t_grp ON t(grp, k);
UPDATE t SET v = randomblob(16 + (id * 40503) % 2033) WHERE id % 3 = 0;
DELETE FROM t WHERE id % 5 = 0;
SELECT count(*) FROM (SELECT grp, count(*), sum(length(v)), max(k) FROM t GROUP BY grp);
SELECT count(*) FROM t a JOIN t b ON a.k = b.k WHERE a.id <> b.id;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {scale} / 2)
INSERT INTO t(k, grp, v) SELECT printf('%016x', x * 2654435761), x % 13,
                                randomblob(1 + (x * 2654435761) % 4096) FROM c;
SELECT count(*), sum(length(v)) FROM t;
VACUUM;
SELECT count(*) FROM t WHERE k > '8';
