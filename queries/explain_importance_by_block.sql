-- title: Explainability - importance of class- vs context-labelled tokens per block
-- Paper: Section 7 per-block maps (which blocks single out the object): the paper's gradient
-- importance (method 'ours': minus the gradient of the block's CLS class-embedding loss w.r.t.
-- the CLS attention row, summed over heads), image tokens with labels from the segmentation mask.
-- Returns one row per variant x block (1..L) x label ('class' | 'context'; 'ignore' left out),
-- experiment 'explain', method 'ours' (table explain; a result set without it gives no rows).
-- Always the paper's gradients: a beyond-paper variant ('ours[ln=frozen,...]') keeps only its
-- global map (block null), like the baselines, so it has no per-block rows here.
-- Columns:
--   variant, block, normalised_block (block / L, L = the variant's largest block in explain),
--   label ('class' | 'context'), tokens (image tokens of that label, pooled over images),
--   mean_importance   mean importance of those tokens (higher = more important)
--   images            images having both class- and context-labelled tokens (the ones compared)
--   object_rank_pct   % of those images whose mean importance over class-labelled tokens is
--                     strictly above that over context-labelled tokens at this block; the same
--                     value on the block's 'class' and 'context' rows (null if no image compares)
WITH ours AS (
    SELECT variant, block, image_key, label, importance
    FROM explain
    WHERE experiment = 'explain' AND method = 'ours' AND block IS NOT NULL
), depth AS (
    SELECT variant, max(block) AS depth FROM ours GROUP BY variant
), per_image AS (   -- one row per variant x block x image: mean importance per label
    SELECT variant, block, image_key,
           avg(CASE WHEN label = 'class' THEN importance END) AS class_mean,
           avg(CASE WHEN label = 'context' THEN importance END) AS context_mean
    FROM ours
    GROUP BY variant, block, image_key
), object_rank AS ( -- one row per variant x block
    SELECT variant, block, count(*) AS images,
           100 * avg((class_mean > context_mean)::INT) AS object_rank_pct
    FROM per_image
    WHERE class_mean IS NOT NULL AND context_mean IS NOT NULL
    GROUP BY variant, block
)
SELECT o.variant, o.block, o.block / d.depth AS normalised_block, o.label,
       count(*) AS tokens,
       avg(o.importance) AS mean_importance,
       coalesce(any_value(r.images), 0) AS images,
       any_value(r.object_rank_pct) AS object_rank_pct
FROM ours o
JOIN depth d ON d.variant = o.variant
LEFT JOIN object_rank r ON r.variant = o.variant AND r.block = o.block
WHERE o.label IN ('class', 'context')
GROUP BY o.variant, o.block, d.depth, o.label
ORDER BY o.variant, o.label, o.block
