-- title: Explainability - deletion-test AUC per method (vs random order)
-- Paper: Section 7 perturbation table (B/32, negative / positive AUC: ours 0.836 / 0.413,
-- Chefer 0.845 / 0.393, linear probe 0.739 / 0.683, random 0.716 / 0.716). A good map has a
-- high negative AUC (its most important tokens alone keep the prediction) and a low positive
-- AUC; both are read against the random order of the same variant and test.
-- Returns one row per variant x method x test, experiment 'explain' (table
-- perturbation_curves; a result set without it gives no rows). The curve is the per-n top-1
-- accuracy of explain_deletion_curves.sql, as a fraction in [0, 1].
-- Columns:
--   variant, method ('ours' | 'chefer' | 'attention' | 'rollout' | 'random'),
--   test ('negative' | 'positive'),
--   images          images in the test
--   points          K = number of kept counts n on the curve (N + 1 when every n was run)
--   auc             trapezoid area of accuracy over kept_fraction n / N in [0, 1] (uneven
--                   spacing of a subset of n counted exactly); 0 for a single point
--   reference_auc   the reference code's normalisation sum_n acc_n / (K * max_n acc_n)
--                   (0 when the accuracy is 0 at every n, as vitlens.explain.deletion)
--   random_auc      auc of method 'random' for the same variant and test (null if not run)
WITH curve AS (    -- one row per variant x method x test x n
    SELECT variant, method, test, kept_tokens,
           avg(kept_fraction::DOUBLE) AS kept_fraction,
           avg(correct::INT) AS accuracy
    FROM perturbation_curves
    WHERE experiment = 'explain'
    GROUP BY variant, method, test, kept_tokens
), trapezoids AS (  -- area between n and the previous kept count (null at the first point)
    SELECT variant, method, test, accuracy,
           (kept_fraction - lag(kept_fraction) OVER w) * (accuracy + lag(accuracy) OVER w) / 2 AS area
    FROM curve
    WINDOW w AS (PARTITION BY variant, method, test ORDER BY kept_tokens)
), image_counts AS (
    SELECT variant, method, test, count(DISTINCT image_key) AS images
    FROM perturbation_curves
    WHERE experiment = 'explain'
    GROUP BY variant, method, test
), per_test AS (
    SELECT t.variant, t.method, t.test, i.images,
           count(*) AS points,
           coalesce(sum(t.area), 0) AS auc,
           CASE WHEN max(t.accuracy) > 0 THEN sum(t.accuracy) / (count(*) * max(t.accuracy)) ELSE 0 END
               AS reference_auc
    FROM trapezoids t
    JOIN image_counts i ON i.variant = t.variant AND i.method = t.method AND i.test = t.test
    GROUP BY t.variant, t.method, t.test, i.images
)
SELECT p.variant, p.method, p.test, p.images, p.points, p.auc, p.reference_auc,
       r.auc AS random_auc
FROM per_test p
LEFT JOIN per_test r ON r.variant = p.variant AND r.test = p.test AND r.method = 'random'
ORDER BY p.variant, p.test, p.method
