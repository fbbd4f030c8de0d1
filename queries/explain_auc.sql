-- title: Explainability - deletion-test AUC per method (vs random order)
-- Paper: Section 7 perturbation table (B/32, negative / positive AUC: ours 0.836 / 0.413,
-- Chefer 0.845 / 0.393, linear probe 0.739 / 0.683, random 0.716 / 0.716). A good map has a
-- high negative AUC (its most important tokens alone keep the prediction) and a low positive
-- AUC; both are read against the random order of the same variant and test.
-- Returns one row per variant x method x test, experiments 'explain' and 'probe' (method
-- 'linear_probe'), table perturbation_curves; a result set without it gives no rows. The curve
-- is the per-n top-1 accuracy of explain_deletion_curves.sql, as a fraction in [0, 1]: the
-- mean over images and, for method 'random', over its random orders (METHOD §6: the random
-- baseline is the mean over >= 10 orders); the AUCs are taken on that mean curve.
-- Columns:
--   variant, method ('ours' | 'chefer' | 'attention' | 'rollout' | 'random' | 'linear_probe'
--                   | a beyond-paper variant of ours such as 'ours[ln=frozen,loss=logit]'),
--   test ('negative' | 'positive'),
--   images          images in the test
--   orders          random orders averaged (1 for every method but 'random')
--   points          K = number of kept counts n on the curve (N + 1 when every n was run)
--   auc             trapezoid area of accuracy over kept_fraction n / N in [0, 1] (uneven
--                   spacing of a subset of n counted exactly); 0 for a single point
--   reference_auc   the reference code's normalisation sum_{n=1}^{N-1} acc_n / (N * max acc)
--                   (METHOD §6; n = 0 and N left out of the sum, the max over every point),
--                   computed as mean(acc_n over the points with 1 <= n <= N-1) * (N-1) / N /
--                   max acc: exact when every n was run; 0 when the accuracy is 0 at every n
--                   or no point lies inside (as vitlens.explain.deletion)
--   random_auc      trapezoid auc of method 'random' (its mean curve over orders) for the same
--                   variant and test: trapezoid against trapezoid (null if not run)
WITH rows AS (
    SELECT variant, method, test, image_key, "order", kept_tokens, kept_fraction, correct
    FROM perturbation_curves
    WHERE experiment IN ('explain', 'probe')
), curve AS (      -- one row per variant x method x test x n: mean over images and orders
    SELECT variant, method, test, kept_tokens,
           avg(kept_fraction::DOUBLE) AS kept_fraction,
           avg(correct::INT) AS accuracy
    FROM rows
    GROUP BY variant, method, test, kept_tokens
), sizes AS (      -- images, orders and N (= n / (n / N) at any n > 0) per curve
    SELECT variant, method, test,
           count(DISTINCT image_key) AS images,
           count(DISTINCT "order") AS orders,
           round(max(CASE WHEN kept_fraction > 0 THEN kept_tokens / kept_fraction::DOUBLE END)) AS num_tokens
    FROM rows
    GROUP BY variant, method, test
), trapezoids AS (  -- area between n and the previous kept count (null at the first point)
    SELECT variant, method, test, kept_tokens, accuracy,
           (kept_fraction - lag(kept_fraction) OVER w) * (accuracy + lag(accuracy) OVER w) / 2 AS area
    FROM curve
    WINDOW w AS (PARTITION BY variant, method, test ORDER BY kept_tokens)
), per_test AS (
    SELECT t.variant, t.method, t.test, s.images, s.orders,
           count(*) AS points,
           coalesce(sum(t.area), 0) AS auc,
           CASE WHEN max(t.accuracy) > 0
                THEN coalesce(avg(CASE WHEN t.kept_tokens BETWEEN 1 AND s.num_tokens - 1 THEN t.accuracy END), 0)
                     * (s.num_tokens - 1) / s.num_tokens / max(t.accuracy)
                ELSE 0 END AS reference_auc
    FROM trapezoids t
    JOIN sizes s ON s.variant = t.variant AND s.method = t.method AND s.test = t.test
    GROUP BY t.variant, t.method, t.test, s.images, s.orders, s.num_tokens
)
SELECT p.variant, p.method, p.test, p.images, p.orders, p.points, p.auc, p.reference_auc,
       r.auc AS random_auc
FROM per_test p
LEFT JOIN per_test r ON r.variant = p.variant AND r.test = p.test AND r.method = 'random'
ORDER BY p.variant, p.test, p.method
