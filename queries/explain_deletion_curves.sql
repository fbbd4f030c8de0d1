-- title: Explainability - deletion curves (top-1 accuracy vs kept image tokens)
-- Paper: Section 7 perturbation tests (METHOD §6), the curves behind the AUC table: keep the
-- prefix tokens plus the n most (negative test) or least (positive test) important image
-- tokens of each method's global map, removed tokens excluded as attention keys.
-- Returns one row per variant x method x test x kept count n, experiments 'explain' and
-- 'probe' (method 'linear_probe'), table perturbation_curves; a result set without it gives
-- no rows. n runs over the kept counts the job wrote (always 0 and N; possibly a subset in
-- between). Method 'random' is the mean curve over its random orders (METHOD §6).
-- Columns:
--   variant, method ('ours' | 'chefer' | 'attention' | 'rollout' | 'random' | 'linear_probe'
--                   | a beyond-paper variant of ours such as 'ours[ln=frozen,loss=logit]'),
--   test ('negative' = most important kept first | 'positive' = least important kept first),
--   kept_tokens     n image tokens kept (plus the prefix), 0..N
--   kept_fraction   n / N (N = image tokens of the variant, the same for every image)
--   images          images with a prediction at this n
--   accuracy_pct    % of those images whose top-1 prediction is the true class (for 'random':
--                   the mean over its orders, each order counting every image once)
SELECT variant, method, test, kept_tokens,
       avg(kept_fraction::DOUBLE) AS kept_fraction,
       count(DISTINCT image_key) AS images,
       100 * avg(correct::INT) AS accuracy_pct
FROM perturbation_curves
WHERE experiment IN ('explain', 'probe')
GROUP BY variant, method, test, kept_tokens
ORDER BY variant, method, test, kept_tokens
