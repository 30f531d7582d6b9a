-- Room on each page of gateway.idempotency_records for the completion's new row version.
--
-- Every idempotent request inserts its record (the claim) and then updates it once with the
-- response (the completion). Since this release the completion changes no indexed column (the
-- expiry is fixed by the claim), so PostgreSQL can write the new version on the same page
-- without new entries in the primary key and the expiry index (a HOT update), if the page has
-- room for it. Pages filled to 100 % by the inserts would leave none; 80 % leaves a fifth.
-- Applies to pages written from now on; existing pages keep their layout until rewritten.
ALTER TABLE gateway.idempotency_records SET (fillfactor = 80);
