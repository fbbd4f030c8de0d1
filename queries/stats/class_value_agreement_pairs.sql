-- title: Class-value agreement paired with the random twin, per class (input of the Wilcoxon test)
-- Paper: Figure 4a's test (one-sided Wilcoxon signed-rank, trained > random, paired by class).
-- Returns one row per trained variant x block x sub-layer x class that its twin NAME@random also has.
-- Columns: variant, block, sublayer, class_index, agreement, random_agreement
SELECT p.variant, p.block, p.sublayer, p.class_index,
       p.class_value_agreement AS agreement,
       r.class_value_agreement AS random_agreement
FROM params p
JOIN params r ON r.variant = p.variant || '@random' AND r.block = p.block
             AND r.sublayer = p.sublayer AND r.class_index = p.class_index
WHERE p.variant NOT LIKE '%@random'
ORDER BY p.variant, p.sublayer, p.block, p.class_index
