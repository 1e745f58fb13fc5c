-- An invocation's row is updated several times while it runs (each append grows its
-- journal's length and bytes, none of them indexed). With room left on its page, such an
-- update stays on the page and touches no index (a heap-only tuple); a full page sends the
-- new version elsewhere, with an entry in every index. Half of each new page is left free.
ALTER TABLE invocations SET (fillfactor = 50);
