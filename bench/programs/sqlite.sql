-- A table of {scale} rows with text keys and blobs of 16 B to 2 KiB in an
-- in-memory database: inserts, an index, updates that resize blobs,
-- deletes, grouped queries and a vacuum.  sqlite3 allocates its page
-- cache and rows from malloc.
CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, grp INTEGER, v BLOB);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {scale})
INSERT INTO t SELECT x, hex(randomblob(4 + abs(random() % 28))), x % 97,
                     randomblob(16 + abs(random() % 2032)) FROM c;
CREATE INDEX t_k ON t(k);
CREATE INDEX t_grp ON t(grp, k);
UPDATE t SET v = randomblob(16 + abs(random() % 2032)) WHERE id % 3 = 0;
DELETE FROM t WHERE id % 5 = 0;
SELECT count(*) FROM (SELECT grp, count(*), sum(length(v)), max(k) FROM t GROUP BY grp);
SELECT count(*) FROM t a JOIN t b ON a.k = b.k WHERE a.id <> b.id;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {scale} / 2)
INSERT INTO t(k, grp, v) SELECT hex(randomblob(8)), x % 13, randomblob(abs(random() % 4096)) FROM c;
SELECT count(*), sum(length(v)) > 0 FROM t;
VACUUM;
SELECT count(*) FROM t WHERE k > '8';
