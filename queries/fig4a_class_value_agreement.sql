-- title: Fig. 4a - class-value agreement vs the random-weights twin
-- Paper: Figure 4a (per block and sub-layer, how well the value vectors align with the class
-- embeddings: per class the max cosine over memories, averaged over classes; parameters only).
-- Returns one row per trained variant (no '@random') x block x sub-layer; the twin's mean is
-- paired by block, sub-layer and class (null if NAME@random was not run).
-- The one-sided Wilcoxon test (trained > random, paired by class) is in the report next to it
-- (input: stats/class_value_agreement_pairs.sql).
-- Columns:
--   variant, block (1..L), normalised_block (block / L), sublayer ('attn' | 'mlp'), classes,
--   mean_agreement, random_mean_agreement
WITH depth AS (
    SELECT variant, max(block) AS depth FROM params GROUP BY variant
)
SELECT p.variant, p.block, p.block / d.depth AS normalised_block, p.sublayer,
       count(*) AS classes,
       avg(p.class_value_agreement) AS mean_agreement,
       avg(r.class_value_agreement) AS random_mean_agreement
FROM params p
JOIN depth d ON p.variant = d.variant
LEFT JOIN params r ON r.variant = p.variant || '@random' AND r.block = p.block
                  AND r.sublayer = p.sublayer AND r.class_index = p.class_index
WHERE p.variant NOT LIKE '%@random'
GROUP BY p.variant, p.block, d.depth, p.sublayer
ORDER BY p.variant, p.sublayer, p.block
