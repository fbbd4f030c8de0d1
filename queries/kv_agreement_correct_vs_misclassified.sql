-- title: Key-value agreement of correctly vs wrongly classified images
-- Paper: Section 6 (key-value agreement rates are higher for correctly classified images;
-- permutation test over images, 300 permutations, in the report next to it;
-- input: stats/kv_agreement_per_image.sql). CLS and image tokens pooled; experiment 'baseline'.
-- Returns one row per variant x block (1..L) x sub-layer.
-- Columns:
--   variant, block, normalised_block (block / L, L = the variant's last residual block),
--   sublayer ('attn' | 'mlp'), correct_images, misclassified_images,
--   correct_pct, misclassified_pct   (pooled agreement rate of the tokens of each group; null if empty)
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant, t.block, t.block / d.depth AS normalised_block, t.stream AS sublayer,
       count(DISTINCT CASE WHEN i.correct THEN t.image_key END) AS correct_images,
       count(DISTINCT CASE WHEN NOT i.correct THEN t.image_key END) AS misclassified_images,
       100 * sum(CASE WHEN i.correct THEN t.kv_agree END) / sum(CASE WHEN i.correct THEN t.tokens END) AS correct_pct,
       100 * sum(CASE WHEN NOT i.correct THEN t.kv_agree END) / sum(CASE WHEN NOT i.correct THEN t.tokens END)
           AS misclassified_pct
FROM token_summary t
JOIN depth d ON t.variant = d.variant
JOIN images i ON i.variant = t.variant AND i.experiment = t.experiment AND i.image_key = t.image_key
WHERE t.experiment = 'baseline' AND t.stream IN ('attn', 'mlp') AND t.token_kind IN ('cls', 'image')
GROUP BY t.variant, t.block, d.depth, t.stream
ORDER BY t.variant, sublayer, t.block
